"""Reconcile finds exactly what Stripe lost: the emulator drops 0.01% of events after its
200, and reconcile names those customers and windows, with the amounts, and nothing else."""

from __future__ import annotations

import http.server
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import stripe
import yaml

from consumer.cli import main
from consumer.config import Settings
from consumer.emitter.truth.summaries import SummaryReader
from consumer.local.broker import TansuBroker
from consumer.local.demo import produce, run_until_drained
from consumer.local.emulator import EmulatorOptions, EmulatorServer, serve
from consumer.local.sample import generate
from consumer.metrics import Metrics
from consumer.ops.reconcile import Report, pieces, reconcile
from consumer.store import open_store
from tests.integration.conftest import METERS, STRIPE_KEY, make_settings

pytestmark = pytest.mark.integration
SUMS = [m for m in METERS if m["aggregation"] == "sum"]  # a lost `last` event has no amount
NAME_OF = {str(m["stripe_event_name"]): str(m["name"]) for m in SUMS}


@pytest.fixture
def lossy() -> Iterator[EmulatorServer]:
    emu = serve("127.0.0.1", 0, EmulatorOptions(seed=17, drop_rate=0.001))
    client = stripe.StripeClient(STRIPE_KEY, base_addresses={"api": emu.url})
    for m in SUMS:
        params: Any = {
            "display_name": str(m["name"]),
            "event_name": str(m["stripe_event_name"]),
            "default_aggregation": {"formula": "sum"},
        }
        client.v1.billing.meters.create(params)
    yield emu
    emu.stop()


def dropped(emu: EmulatorServer) -> list[dict[str, str]]:
    with urllib.request.urlopen(f"{emu.url}/_emulator/state", timeout=5) as resp:
        rows: list[dict[str, str]] = json.loads(resp.read())["dropped"]
    return rows


def run(settings: Settings, emu: EmulatorServer, start: int, end: int) -> Report:
    store = open_store(settings.clickhouse)
    try:
        api = stripe.StripeClient(STRIPE_KEY, base_addresses={"api": emu.url})
        summaries = SummaryReader(api, lambda: None)
        return reconcile(store, summaries, settings.meters, start, end, metrics=Metrics())
    finally:
        store.close()


def test_reconcile_names_exactly_the_windows_where_stripe_lost_events(
    broker: TansuBroker, lossy: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    settings = make_settings(broker, lossy, tmp_path, unique, meters=SUMS)
    k = settings.kafka
    broker.create_topics({k.topic: 3, k.dlq_topic: 1, k.late_topic: 1})
    # 0.1% is rare: produce rounds until Stripe has lost a few events
    for round_ in range(8):
        sample = generate(25_000, 40, 3, int(time.time() * 1000), seed=round_, customer_prefix="c")
        ends = produce(sample, broker.bootstrap, k.topic)
        run_until_drained(settings, ends, timeout=180, quiet=True)
        if len(dropped(lossy)) >= 2:
            break
    lost = dropped(lossy)
    assert len(lost) >= 2, "the emulator lost nothing; the test needs losses"

    end = (int(time.time()) // 60 + 10) * 60
    start = (end - 2 * 86400) // 3600 * 3600
    want: dict[tuple[str, str, int], Decimal] = {}
    for e in lost:
        key = (e["customer"], NAME_OF[e["event_name"]], int(e["timestamp"]) // 3600 * 3600)
        want[key] = want.get(key, Decimal(0)) - Decimal(e["value"])
    report = run(settings, lossy, start, end)
    got = {(x.customer, x.meter, x.start): x.drift for x in report.drifting}
    assert got == want
    assert report.total_drift() == -sum(want.values())
    assert len(report.lines) > 10 * len(want)  # many windows were compared, few drift

    # the command: a drift table, the verdict line, exit 1; within a tolerance, exit 0
    config = tmp_path / "config.yaml"
    stripe_keys = {"api_key": STRIPE_KEY, "api_base": lossy.url}
    chdb = {"chdb_path": str(settings.clickhouse.chdb_path)}
    config.write_text(yaml.safe_dump({"clickhouse": chdb, "stripe": stripe_keys, "meters": SUMS}))
    args = ["--config", str(config), "reconcile", "--from", str(start), "--to", str(end)]
    assert main([*args, "--settle-seconds", "0"]) == 1
    biggest = max(abs(v) for v in want.values())
    assert main([*args, "--settle-seconds", "0", "--tolerance", str(biggest)]) == 0

    # As a CronJob: the drift gauges pushed to a Pushgateway, where the drift alert reads
    # them (a reconcile process is never scraped); its own gauges only.
    with _Gateway() as gateway:
        assert main([*args, "--settle-seconds", "0", "--pushgateway", gateway.url]) == 1
    ((method, path, body),) = gateway.pushes
    assert (method, path) == ("PUT", "/metrics/job/usage-consumer-reconcile")
    pushed = {
        line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line.startswith("usage_consumer_reconcile_drift{")
    }
    assert {k.split('"')[1] for k, v in pushed.items() if v > 0} == {m for _, m, _ in want}
    assert "usage_consumer_events_consumed" not in body


class _Gateway:
    """A stand-in Pushgateway that records each push (method, path, body)."""

    def __init__(self) -> None:
        pushes: list[tuple[str, str, str]] = []
        self.pushes = pushes

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                n = int(self.headers.get("Content-Length", 0))
                pushes.append(("PUT", self.path, self.rfile.read(n).decode()))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                return

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"

    def __enter__(self) -> _Gateway:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_windows_are_whole_hours_with_partial_edges() -> None:
    cuts = pieces(3600 + 600, 4 * 3600 + 120, "hour")
    assert [(p.start, p.end, p.grouped) for p in cuts] == [
        (4200, 7200, False),
        (7200, 10800, True),
        (10800, 14400, True),
        (14400, 14520, False),
    ]
    assert [(p.start, p.end) for p in pieces(600, 1200, "day")] == [(600, 1200)]
    for bad in [(30, 600, "hour"), (600, 600, "hour"), (0, 600, "week")]:
        with pytest.raises(ValueError):
            pieces(*bad)


def test_the_command_refuses_bad_arguments_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"stripe": {"api_key": "sk_test_x"}}))
    base = ["--config", str(config), "reconcile"]
    assert main([*base, "--from", "yesterday"]) == 2
    assert "not a time: 'yesterday'" in capsys.readouterr().err
    assert main([*base, "--from", "2026-01-01T00:00:00"]) == 2
    assert "needs a time zone" in capsys.readouterr().err
    assert main([*base, "--from", "100", "--to", "90"]) == 2
    assert "--from and --to must be whole minutes" in capsys.readouterr().err
    assert main([*base, "--tolerance", "-1"]) == 2
    assert "--tolerance" in capsys.readouterr().err
