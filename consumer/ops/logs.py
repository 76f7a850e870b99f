"""The process's log lines: text for people, or one JSON object a line for a log pipeline
(`log.format: json`); either way, no configured secret is ever written. Secrets are kept
out of messages by construction; the filter is the second line, for a library's message
(an exception from a client, a librdkafka line) that quotes one back."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from consumer.config import Settings

TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MASK = "[redacted]"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:  # the filtered text when Redact made it
            doc["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


class Redact(logging.Filter):
    """Replaces each secret in a record's message and traceback before any handler writes it."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self._secrets = [s for s in secrets if len(s) >= 4]  # "" or a stub would mask words

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        masked, exc = message, record.exc_text or ""
        for secret in self._secrets:
            masked, exc = masked.replace(secret, MASK), exc.replace(secret, MASK)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_text:
            record.exc_text = exc
        return True


def secrets_of(settings: Settings) -> list[str]:
    values = [
        settings.stripe.api_key,
        settings.kafka.sasl_password,
        settings.clickhouse.password,
        settings.schema_.registry_password,
    ]
    return [v.get_secret_value() for v in values if v is not None]


def configure(settings: Settings) -> None:
    """Format and filter every handler of the root logger as the settings say."""
    formatter = JsonFormatter() if settings.log.format == "json" else logging.Formatter(TEXT)
    redact = Redact(secrets_of(settings))
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)
        handler.addFilter(redact)
