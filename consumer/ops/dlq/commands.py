"""The `dlq` subcommands: what `usage-consumer dlq ...` runs, the clients handed in."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TextIO

from confluent_kafka import Producer

from consumer.clock import Clock
from consumer.config import Settings
from consumer.decode.validate import DAY_MS, Limits
from consumer.ops.dlq import redrive
from consumer.ops.dlq.select import (
    Decode,
    DlqError,
    Filters,
    copy_outcomes,
    find,
    one,
    parse_when,
    parse_which,
    with_redrives,
)
from consumer.ops.dlq.show import format_list, format_one
from consumer.ops.progress import Progress
from consumer.store import releases
from consumer.store.backend import Backend


def filters(args: argparse.Namespace, settings: Settings, clock: Clock) -> Filters:
    now = clock.now()
    names = {m.name: m.event_name for m in settings.meters}
    return Filters(
        topic=settings.kafka.topic,
        since_ms=parse_when(args.since, now),
        until_ms=parse_when(args.until, now) if args.until else int(now * 1000) + 1,
        reasons=tuple(args.reason),
        partitions=tuple(args.partition),
        meters=tuple(names.get(m, m) for m in args.meter),
    )


def list_(
    args: argparse.Namespace, settings: Settings, store: Backend, decode: Decode, clock: Clock
) -> int:
    if args.limit < 1:
        raise DlqError("--limit must be 1 or more")
    rows, total = find(store, filters(args, settings, clock), decode, args.limit)
    with_redrives(store, rows)
    print(format_list(rows, args.format))
    if args.format == "table":
        more = total - len(rows)
        tail = f"; {more} more matched (raise --limit or narrow the filters)" if more else ""
        print(f"\n{len(rows)} dead letters{tail}")
    elif total > len(rows):
        print(f"{total - len(rows)} more matched (raise --limit)", file=sys.stderr)
    return 0


def show(args: argparse.Namespace, settings: Settings, store: Backend, decode: Decode) -> int:
    topic, partition, offset = parse_which(args.which, settings.kafka.topic)
    d = one(store, topic, partition, offset, decode)
    with_redrives(store, [d])
    copies = [(p, o) for _, _, p, o in d.redrives if o >= 0]
    print(format_one(d, copy_outcomes(store, topic, copies)))
    return 0


def redrive_(
    args: argparse.Namespace,
    settings: Settings,
    store: Backend,
    decode: Decode,
    clock: Clock,
    producer: Callable[[], Producer],
    out: TextIO | None = None,
) -> int:
    out = out or sys.stdout  # looked up per call: the caller may have replaced it
    if args.batch_size < 1:
        raise DlqError("--batch-size must be 1 or more")
    f = filters(args, settings, clock)
    rows, _ = find(store, f, decode, None)
    if "poison" not in f.reasons:  # a message that crashed the consumer: only when asked
        rows = [d for d in rows if d.reason != "poison"]
    with_redrives(store, rows)
    p = settings.pipeline
    limits = Limits(p.future_tolerance_seconds * 1000, p.max_past_days * DAY_MS)
    plan = redrive.plan(
        store,
        rows,
        settings.meters,
        limits,
        settings.kafka.group_id,
        p.dedup_window_seconds * 1000,
        args.again,
    )
    verb = "would re-drive" if args.dry_run else "re-driving"
    print(f"{verb} {len(plan.send)} of {len(rows)} dead letters matched; as of now:", file=out)
    for what, n in plan.summary():
        print(f"  {n:>8}  {what}", file=out)
    if args.dry_run or not plan.send:
        return 0
    rid = redrive.run_id(int(clock.now() * 1000), plan.send)
    bar = Progress("redrive", len(plan.send))
    client = producer()
    now_ms = lambda: int(clock.now() * 1000)  # noqa: E731
    sent = redrive.send(store, client, plan.send, rid, now_ms, bar.update, args.batch_size)
    bar.done(sent)
    print(
        f"re-drove {sent} dead letters to {settings.kafka.topic} (run {rid}); the consumer "
        "counts each event once. Check with: usage-consumer dlq list --since "
        f"{args.since} (copies that fail again are new dead letters, 'copy of ...')",
        file=out,
    )
    return 0


def release(args: argparse.Namespace, settings: Settings, store: Backend, clock: Clock) -> int:
    if args.partition < 0 or args.first < 0 or args.last < args.first:
        raise DlqError("--partition and --from must be 0 or more, --to at least --from")
    r = releases.Release(
        settings.kafka.topic,
        args.partition,
        args.first,
        args.last,
        args.reason or "",
        redrive.operator(),
        int(clock.now() * 1000),
    )
    releases.record(store, r)
    print(
        f"released {r.topic} partition {r.partition} offsets {r.first_offset}-{r.last_offset} "
        f"({r.last_offset - r.first_offset + 1} offsets): the next start dead-letters them "
        "instead of stopping"
    )
    return 0
