"""`usage-consumer`: run, produce, migrate, totals, reconcile, meters sync, stripe-emulator,
demo."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

from consumer.config import ConfigError, Settings, load_settings
from consumer.ops.logs import TEXT
from consumer.store import StoreError

if TYPE_CHECKING:  # the CLI imports heavy modules only for the command it runs
    from consumer.clock import Clock
    from consumer.emitter.truth.standing import Undelivered
    from consumer.metrics import Metrics
    from consumer.store import Backend

log = logging.getLogger("usage_consumer")


def _settings(args: argparse.Namespace) -> Settings:
    from consumer.ops import logs

    settings = load_settings(args.config)
    logs.configure(settings)  # from here on: the configured format, secrets masked
    return settings


def cmd_run(args: argparse.Namespace) -> int:
    from consumer.clock import SystemClock

    return serve(_settings(args), SystemClock())


def serve(settings: Settings, clock: Clock, store: Backend | None = None) -> int:
    """`run`: the pipeline with /metrics and probes until SIGTERM or SIGINT, then a drain.
    The clock and store are injected so the crash harness can skew one and fault the other."""
    from consumer.app import build_pipeline
    from consumer.metrics import Metrics
    from consumer.ops import health as health_http

    metrics = Metrics()
    p = settings.pipeline
    health = health_http.Health(clock, p.stall_seconds)
    _, port = health_http.serve(p.metrics_host, p.metrics_port, metrics, health)
    log.info("metrics on :%d (/metrics /healthz /readyz)", port)
    pipeline = build_pipeline(settings, clock, metrics, health, store)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: draining in-flight work, then committing and exiting", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    pipeline.run(stop)
    log.info("stopped cleanly")
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from consumer.local.demo import produce
    from consumer.local.sample import generate

    settings = _settings(args)
    sample = generate(
        args.events, args.customers, args.partitions, int(time.time() * 1000), args.seed
    )
    ends = produce(sample, settings.kafka.bootstrap_servers, settings.kafka.topic)
    print(
        f"produced {len(sample.messages)} messages ({dict(sample.kinds)}) "
        f"into {len(ends)} partitions"
    )
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from consumer.store import open_store
    from consumer.store.prepare import prepare_store

    cfg = _settings(args).clickhouse
    store = open_store(cfg)
    try:
        applied = prepare_store(store, cfg)
    finally:
        store.close()
    print(f"migrations applied: {applied or 'none (up to date)'}")
    return 0


def cmd_totals(args: argparse.Namespace) -> int:
    from consumer.emitter.truth.standing import undelivered
    from consumer.ops.totals import clickhouse_totals, format_table
    from consumer.store import open_store
    from consumer.store.errors import UNKNOWN_TABLE

    settings = _settings(args)
    store = open_store(settings.clickhouse)
    try:
        totals = clickhouse_totals(store, settings.meters, args.customer)
        held = [u for u in undelivered(store) if args.customer in (None, u.customer_id)]
    except StoreError as exc:
        if exc.code == UNKNOWN_TABLE:
            raise StoreError("the store has no schema yet: run `usage-consumer migrate`") from None
        raise
    finally:
        store.close()
    agg = {m.name: m.aggregation for m in settings.meters}
    rows = [[c, m, agg[m], format(v.normalize(), "f")] for (c, m), v in sorted(totals.items())]
    print(format_table(["customer", "meter", "aggregation", "total"], rows))
    if held:
        print(f"\nnot billed by Stripe ({len(held)} pushes held for a person):")
        print(format_table(["customer", "meter", "status", "value", "reason"], _held_rows(held)))
    quarantined = [u.identifier for u in held if u.status == "quarantined"]
    if quarantined:
        print("\nquarantined (`usage-consumer release IDENTIFIER` once the cause is fixed):")
        print("\n".join(quarantined))
    return 0


def _held_rows(held: list[Undelivered]) -> list[list[str]]:
    """Rejected and expired usage per customer, meter, status and reason."""
    sums: dict[tuple[str, str, str, str], Decimal] = {}
    for u in held:
        key = (u.customer_id, u.meter, u.status, u.reason)
        sums[key] = sums.get(key, Decimal(0)) + u.value
    return [[c, m, st, format(v.normalize(), "f"), r] for (c, m, st, r), v in sorted(sums.items())]


def cmd_reconcile(args: argparse.Namespace) -> int:
    from consumer.clock import SystemClock
    from consumer.emitter.send.ratelimit import TokenBucket
    from consumer.emitter.send.session import stripe_client
    from consumer.emitter.truth.summaries import SummaryReader
    from consumer.metrics import Metrics
    from consumer.ops.reconcile import ReconcileError, format_report, parse_time, reconcile
    from consumer.store import open_store

    settings = _settings(args)
    s = settings.stripe
    if s.api_key is None:
        raise ConfigError("stripe.api_key: required to read Stripe's event summaries")
    try:
        end = parse_time(args.to) if args.to else int(time.time())
        end = min(end, int(time.time() - args.settle_seconds)) // 60 * 60
        start = parse_time(args.start) if args.start else end - 86400
        tolerance = Decimal(args.tolerance)
        if not tolerance.is_finite() or tolerance < 0:
            raise ReconcileError("--tolerance must be a number of units, 0 or more")
    except (ReconcileError, ArithmeticError) as exc:
        print(f"usage-consumer reconcile: {exc}", file=sys.stderr)
        return 2
    limiter = TokenBucket(s.requests_per_second, SystemClock())
    api = stripe_client(s.api_key.get_secret_value(), {"api": s.api_base})
    store = open_store(settings.clickhouse)
    metrics = Metrics()
    try:
        summaries = SummaryReader(api, limiter.acquire)
        report = reconcile(
            store, summaries, settings.meters, start, end,
            window=args.window, customer=args.customer, metrics=metrics,
        )  # fmt: skip
    except ReconcileError as exc:
        print(f"usage-consumer reconcile: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    print(format_report(report, args.all))
    if args.pushgateway:
        push_result(args.pushgateway, metrics)
    return 0 if report.within(tolerance) else 1


def push_result(gateway: str, metrics: Metrics) -> None:
    """A reconcile is a batch job (a CronJob), never scraped: its drift gauges go to a
    Prometheus Pushgateway, where the drift alert reads them. Only the reconcile's own
    gauges, not the pipeline's (all zero in this process)."""
    from prometheus_client import CollectorRegistry, push_to_gateway

    registry = CollectorRegistry()
    registry.register(metrics.reconcile_drift)
    registry.register(metrics.reconcile_windows)
    try:
        push_to_gateway(gateway, job="usage-consumer-reconcile", registry=registry, timeout=10)
    except OSError as exc:  # the report is printed and the exit code stands: say it loudly
        print(f"usage-consumer reconcile: could not push to {gateway}: {exc}", file=sys.stderr)


def cmd_meters(args: argparse.Namespace) -> int:
    from consumer.clock import SystemClock
    from consumer.emitter.send.ratelimit import TokenBucket
    from consumer.emitter.send.session import stripe_client
    from consumer.ops.meters_sync import accounts_of, apply, format_plan, plan

    settings = _settings(args)
    s = settings.stripe
    if s.api_key is None:
        raise ConfigError("stripe.api_key: required to read and create Stripe meters")
    api = stripe_client(s.api_key.get_secret_value(), {"api": s.api_base})
    pace = TokenBucket(s.requests_per_second, SystemClock()).acquire
    actions = plan(api, settings.meters, accounts_of(s), pace)
    conflicts = [a for a in actions if a.action == "conflict"]
    if not args.dry_run:
        actions = apply(api, actions, settings.meters, pace)
    print(format_plan(actions))
    changes = sum(a.action in ("create", "reactivate", "created", "reactivated") for a in actions)
    verb = "would change" if args.dry_run else "changed"
    print(f"meters: {verb} {changes}, conflicts {len(conflicts)}, of {len(actions)}")
    return 1 if conflicts else 0


def cmd_emulator(args: argparse.Namespace) -> int:
    # Its options are parsed here, not by parser(): `run` never imports consumer.local.
    from consumer.local.emulator.args import add_arguments, to_options
    from consumer.local.emulator.server import main as emulator_main

    own = argparse.ArgumentParser(
        prog="usage-consumer stripe-emulator", description="serve the Stripe meter APIs locally"
    )
    add_arguments(own)
    options = own.parse_args(args.emulator_args)
    emulator_main(options.host, options.port, to_options(options))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from consumer.local.demo import main as demo_main

    return demo_main(Path(args.workdir), args.events, args.customers, args.partitions, args.seed)


def cmd_release(args: argparse.Namespace) -> int:
    from consumer.clock import SystemClock
    from consumer.ops.release import NotQuarantined, release
    from consumer.store import open_store

    store = open_store(_settings(args).clickhouse)
    try:
        push = release(store, args.identifier, int(SystemClock().now() * 1000))
    except NotQuarantined as exc:
        print(f"usage-consumer: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(
        f"released {push.identifier} ({push.meter}, customer {push.customer_id}, value "
        f"{format(push.value.normalize(), 'f')}): the emitter sends it again"
    )
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="usage-consumer", description=__doc__)
    ap.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML configuration file (environment variables override it)",
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="consume, write ClickHouse, emit to Stripe until stopped")
    pr = sub.add_parser("produce", help="produce a sample with duplicates and bad messages")
    pr.add_argument("--events", type=int, default=100_000)
    pr.add_argument("--customers", type=int, default=50)
    pr.add_argument("--partitions", type=int, default=3)
    pr.add_argument("--seed", type=int, default=7)
    sub.add_parser("migrate", help="apply the ClickHouse schema migrations")
    t = sub.add_parser("totals", help="per-customer totals from ClickHouse")
    t.add_argument("--customer", default=None)
    r = sub.add_parser("reconcile", help="ClickHouse and the outbox against Stripe's summaries")
    r.add_argument("--from", dest="start", default=None, help="RFC 3339 or epoch s (24 h ago)")
    r.add_argument("--to", default=None, help="RFC 3339 or epoch seconds (default: now)")
    r.add_argument("--customer", default=None)
    r.add_argument("--window", choices=["hour", "day"], default="hour")
    r.add_argument("--tolerance", default="0", help="drift per window allowed (default exact)")
    r.add_argument(
        "--settle-seconds", type=float, default=300.0, help="recent time left out (default 300)"
    )
    r.add_argument("--all", action="store_true", help="show every window, not only drift")
    r.add_argument(
        "--pushgateway",
        default=None,
        help="push the drift gauges to this Prometheus Pushgateway (host:port or URL)",
    )
    ms = sub.add_parser("meters", help="the Stripe meters the configuration bills")
    ms_sub = ms.add_subparsers(dest="meters_command", required=True)
    sync = ms_sub.add_parser("sync", help="create or verify them (idempotent)")
    sync.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    sub.add_parser(
        "stripe-emulator",
        help="serve the Stripe meter APIs locally (--help: its options)",
        add_help=False,
    )
    rel = sub.add_parser("release", help="send a quarantined Stripe push again (its cause fixed)")
    rel.add_argument("identifier", help="the push's identifier (usage-consumer totals lists it)")
    d = sub.add_parser("demo", help="the whole pipeline on the embedded default, checked")
    d.add_argument("--workdir", default=".demo")
    d.add_argument("--events", type=int, default=100_000)
    d.add_argument("--customers", type=int, default=50)
    d.add_argument("--partitions", type=int, default=3)
    d.add_argument("--seed", type=int, default=7)
    return ap


COMMANDS = {
    "run": cmd_run,
    "produce": cmd_produce,
    "migrate": cmd_migrate,
    "totals": cmd_totals,
    "reconcile": cmd_reconcile,
    "meters": cmd_meters,
    "stripe-emulator": cmd_emulator,
    "demo": cmd_demo,
    "release": cmd_release,
}


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args, rest = ap.parse_known_args(argv)
    if args.command == "stripe-emulator":
        args.emulator_args = rest  # its own parser reads them (cmd_emulator)
    elif rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format=TEXT)
    # The SDK logs every request at INFO; keep it to problems unless asked.
    logging.getLogger("stripe").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"usage-consumer: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"usage-consumer: ClickHouse: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
