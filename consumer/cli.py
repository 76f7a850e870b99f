"""`usage-consumer`: run, produce, migrate, totals, reconcile, replay, meters sync, doctor,
dlq, stripe-emulator, demo."""

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
    from consumer.ops.reconcile import Report
    from consumer.store import Backend

log = logging.getLogger("usage_consumer")


def _settings(args: argparse.Namespace) -> Settings:
    from consumer.ops import logs

    settings = load_settings(args.config)
    logs.configure(settings)  # from here on: the configured format, secrets masked
    return settings


def cmd_run(args: argparse.Namespace) -> int:
    from consumer.clock import SystemClock
    from consumer.ingest.ranges import DeadLetterFlood

    try:
        return serve(_settings(args), SystemClock())
    except DeadLetterFlood as exc:  # waits for an operator: one line naming what to run
        config = f" --config {args.config}" if args.config else ""
        print(
            f"usage-consumer: {exc}. If they are garbage, dead-letter exactly these offsets "
            f"and carry on: usage-consumer{config} dlq release --partition {exc.partition} "
            f"--from {exc.start} --to {exc.end - 1} --reason '...'",
            file=sys.stderr,
        )
        return 4


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
        print("\nquarantined (`usage-consumer push release IDENTIFIER` once the cause is fixed):")
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
        print(format_report(report, args.all))
        repaired = _repair(settings, store, report, args.settle_seconds) if args.repair else None
    except ReconcileError as exc:
        print(f"usage-consumer reconcile: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    if args.pushgateway:
        push_result(args.pushgateway, metrics)
    if repaired is not None:  # every drifting window queued, on its way or settling: 0
        return repaired
    return 0 if report.within(tolerance) else 1


def _repair(settings: Settings, store: Backend, report: Report, settle_seconds: float) -> int:
    """`reconcile --repair`: queue what Stripe lost for the emitter (consumer/ops/repair.py);
    1 when a window needs a person."""
    from consumer.emitter.truth.delivery import DeliveryPolicy
    from consumer.ops.repair import PERSON, Limits, format_actions, repair

    now_ms = int(time.time() * 1000)
    oldest = DeliveryPolicy.from_config(settings.stripe).limit_ms(now_ms)
    limits = Limits(now_ms, int(settle_seconds * 1000), oldest)
    actions, queued = repair(store, report, settings.meters, limits)
    print(format_actions(actions))
    if queued:
        print(
            f"repair: {queued} pushes are in the outbox; the emitter holding the lease sends them"
        )
    return 1 if any(a.kind == PERSON for a in actions) else 0


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


def cmd_replay(args: argparse.Namespace) -> int:
    from consumer.ops.replay import ReplayError, run_replay

    settings = _settings(args)
    try:
        return run_replay(settings, args.start, args.to, args.meter, args.customer, args.dry_run)
    except ReplayError as exc:
        print(f"usage-consumer replay: {exc}", file=sys.stderr)
        return 2


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


def cmd_doctor(args: argparse.Namespace) -> int:
    from consumer.clock import SystemClock
    from consumer.ops.doctor.checks import run_doctor
    from consumer.ops.doctor.report import Status, format_report
    from consumer.ops.doctor.runner import exit_code

    findings = run_doctor(_settings(args), SystemClock(), args.timeout)
    print(format_report(findings))
    return exit_code(findings, Status[args.fail_on.upper()])


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


def cmd_dlq(args: argparse.Namespace) -> int:
    from confluent_kafka import Producer

    from consumer.app import build_decoder
    from consumer.clock import SystemClock
    from consumer.ingest.kafka import producer_config
    from consumer.ops.dlq import commands
    from consumer.ops.dlq.select import DlqError, decoder_of
    from consumer.store import open_store

    settings = _settings(args)
    clock = SystemClock()
    store = open_store(settings.clickhouse)
    if not args.verbose:  # which decoder runs is the consumer's news, not an operator's
        logging.getLogger("consumer.app").setLevel(logging.WARNING)
    try:
        decode = decoder_of(build_decoder(settings.schema_).decode)
        if args.dlq_command == "list":
            return commands.list_(args, settings, store, decode, clock)
        if args.dlq_command == "show":
            return commands.show(args, settings, store, decode)
        if args.dlq_command == "redrive":
            make = lambda: Producer(producer_config(settings.kafka))  # noqa: E731
            return commands.redrive_(args, settings, store, decode, clock, make)
        return commands.release(args, settings, store, clock)
    except DlqError as exc:
        print(f"usage-consumer dlq: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()


def cmd_push(args: argparse.Namespace) -> int:
    from consumer.clock import SystemClock
    from consumer.ops.push_release import NotQuarantined, release
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
    r.add_argument(
        "--repair",
        action="store_true",
        help="queue what Stripe lost for the emitter; report what it holds too much of",
    )
    rp = sub.add_parser("replay", help="recompute a time range's windows from the ledger")
    rp.add_argument("--from", dest="start", required=True, help="RFC 3339 or epoch seconds")
    rp.add_argument("--to", required=True, help="RFC 3339 or epoch seconds (exclusive)")
    rp.add_argument("--meter", default=None, help="one meter (default: every meter)")
    rp.add_argument("--customer", default=None)
    rp.add_argument("--dry-run", action="store_true", help="print what would change, write nothing")
    ms = sub.add_parser("meters", help="the Stripe meters the configuration bills")
    ms_sub = ms.add_subparsers(dest="meters_command", required=True)
    sync = ms_sub.add_parser("sync", help="create or verify them (idempotent)")
    sync.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    dr = sub.add_parser(
        "doctor",
        help="check what `run` relies on (exit 0 all OK, 1 worst WARN, 2 worst FAIL)",
    )
    dr.add_argument("--timeout", type=float, default=10.0, help="seconds per check (10)")
    dr.add_argument(
        "--fail-on",
        choices=["warn", "fail"],
        default="warn",
        help="the least status that exits non-zero (default warn; fail: WARN exits 0)",
    )
    sub.add_parser(
        "stripe-emulator",
        help="serve the Stripe meter APIs locally (--help: its options)",
        add_help=False,
    )
    dq = sub.add_parser("dlq", help="list, show, re-drive and release dead letters")
    dq_sub = dq.add_subparsers(dest="dlq_command", required=True)
    dl = dq_sub.add_parser("list", help="dead letters by reason, time, partition and meter")
    dl.add_argument("--limit", type=int, default=50, help="default %(default)s")
    dl.add_argument("--format", choices=["table", "json", "csv"], default="table")
    dw = dq_sub.add_parser("show", help="one dead letter in full, its bytes decoded")
    dw.add_argument("which", help="PARTITION:OFFSET as `dlq list` prints it")
    dr = dq_sub.add_parser("redrive", help="send dead letters back once their cause is fixed")
    dr.add_argument("--dry-run", action="store_true", help="say what would happen, send nothing")
    dr.add_argument("--again", action="store_true", help="also those re-driven before")
    dr.add_argument("--batch-size", type=int, default=500, help="copies a recorded batch")
    for f in (dl, dr):  # the filters both take
        f.add_argument("--reason", action="append", default=[], help="a reason (repeatable)")
        f.add_argument("--since", default="7d", help="RFC 3339, epoch s or an age (default 7d)")
        f.add_argument("--until", default=None, help="RFC 3339, epoch s or an age (default now)")
        f.add_argument("--partition", type=int, action="append", default=[], help="(repeatable)")
        f.add_argument(
            "--meter", action="append", default=[], help="meter or event name (repeatable)"
        )
    de = dq_sub.add_parser("release", help="let a range through the dead-letter flood stop")
    de.add_argument("--partition", type=int, required=True)
    de.add_argument("--from", dest="first", type=int, required=True, help="first offset")
    de.add_argument("--to", dest="last", type=int, required=True, help="last offset (included)")
    de.add_argument("--reason", default=None, help="why, recorded with the release")
    pu = sub.add_parser("push", help="a Stripe push held for a person")
    pu_sub = pu.add_subparsers(dest="push_command", required=True)
    rel = pu_sub.add_parser("release", help="send a quarantined push again (its cause fixed)")
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
    "replay": cmd_replay,
    "meters": cmd_meters,
    "doctor": cmd_doctor,
    "stripe-emulator": cmd_emulator,
    "demo": cmd_demo,
    "dlq": cmd_dlq,
    "push": cmd_push,
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
