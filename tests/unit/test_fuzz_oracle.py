"""The run-path fuzz's oracle (tests/fuzz/model.py) against the consumer's decode and validate
stages, in process: on the fuzz's own messages both must take and refuse the same ones and
read the same events. A difference here is found in a second, without Kafka; the run-path
fuzz (tests/integration/test_fuzz_run.py) then holds the whole pipeline to the oracle."""

from __future__ import annotations

import json
import random
from typing import Any

import fastavro

from consumer.config import default_meters
from consumer.decode.event import DecodeError
from consumer.decode.reference import Decoder
from consumer.decode.schemas import LocalSchemaSource, UnknownSchemaId, reader_schema
from consumer.decode.validate import Invalid, Limits, validate
from tests.fuzz.messages import Generator
from tests.fuzz.model import METERS
from tests.fuzz.run import schemas

NOW = 1_796_641_200_000


class Source:
    """The packaged schemas and the fuzz registry's extra ones."""

    def __init__(self) -> None:
        self.local = LocalSchemaSource()
        self.extra = {
            k: fastavro.parse_schema(json.loads(json.loads(v)["schema"]))
            for k, v in schemas().items()
        }

    def writer_schema(self, schema_id: int) -> Any:
        if schema_id in self.extra:
            return self.extra[schema_id]
        return self.local.writer_schema(schema_id)


def test_the_oracle_and_the_consumer_agree_on_every_fuzz_message() -> None:
    seed = random.SystemRandom().randrange(10**6)
    print(f"seed {seed}")
    meters = {m.event_name: m for m in default_meters()}
    assert {n: (m.name, m.aggregation) for n, m in meters.items()} == METERS
    decoder = Decoder(mode="confluent", source=Source(), reader=reader_schema())
    gen = Generator(seed, 3, NOW)
    checked = 0
    for m in gen.messages(3000):
        if m.verdict.beyond:
            continue
        try:
            event = decoder.decode(m.value)
            validate(event, NOW, meters, Limits())
        except (DecodeError, Invalid, UnknownSchemaId) as exc:
            assert m.verdict.event is None, f"seed {seed}: {m.what} {m.value!r}: {exc}"
            continue
        want = m.verdict.event
        assert want is not None, f"seed {seed}: the consumer takes {m.what} {m.value!r}"
        got = (event.event_id, event.event_name, event.customer_id, event.value)
        assert got == (want.event_id, want.event_name, want.customer_id, want.value)
        assert (event.timestamp_ms, event.cancels) == (want.timestamp_ms, want.cancels)
        checked += 1
    assert checked > 1500
