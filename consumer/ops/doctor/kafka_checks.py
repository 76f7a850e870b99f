"""Kafka: the topics `run` reads and writes (present, partition counts, retention), and this
host's clock against the broker's."""

from __future__ import annotations

import socket
from typing import Any

from confluent_kafka import TIMESTAMP_LOG_APPEND_TIME, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType  # type: ignore[attr-defined]

from consumer.config import KafkaConfig, Settings
from consumer.control import append
from consumer.ingest.kafka import TopicIds, client_config, producer_config
from consumer.ops.doctor.report import Finding, fail, ok, span, warn
from consumer.ops.doctor.runner import Env
from consumer.ops.doctor.store_checks import state_partitions

WARN_SKEW_SECONDS = 5.0


def _quiet(cfg: KafkaConfig, timeout: float) -> dict[str, Any]:
    """The consumer's own client settings; librdkafka's connection lines stay out of the
    table (the finding says what failed)."""
    conf = client_config(cfg)
    conf.update({"log_level": 0, "socket.timeout.ms": int(timeout * 1000)})
    return conf


def _create(topic: str, partitions: int) -> str:
    return (
        f"create it: kafka-topics.sh --bootstrap-server <broker> --create --topic {topic} "
        f"--partitions {partitions}"
    )


def _retention_need(settings: Settings) -> dict[str, tuple[int, str]]:
    """Seconds each topic must keep a record, and why. The source: the longest allowed
    lateness plus the dedup horizon, so records can still be re-read (a replay, a re-formed
    range after an outage) while the ledger still recognises their copies. Dead letters and
    late events: the longest lateness, so a mended one re-driven still counts."""
    k, p = settings.kafka, settings.pipeline
    lateness = max(m.allowed_lateness_seconds for m in settings.meters)
    return {
        k.topic: (lateness + p.dedup_window_seconds, "lateness + dedup horizon"),
        k.dlq_topic: (lateness, "allowed lateness"),
        k.late_topic: (lateness, "allowed lateness"),
    }


def topics(env: Env) -> list[Finding]:
    """Every topic present; the source with at least as many partitions as the store has
    state for; the control topic with one; retention past what each must outlive."""
    k = env.settings.kafka
    admin = AdminClient(_quiet(k, env.timeout))
    found = admin.list_topics(timeout=env.timeout).topics
    roles = [("source", k.topic), ("dead letters", k.dlq_topic), ("late", k.late_topic)]
    present = [t for _, t in roles if t in found and found[t].error is None]
    retention = _retention(admin, present, env.timeout)
    need = _retention_need(env.settings)
    out = []
    for role, topic in roles:
        check = f"topic {topic}"
        if topic not in present:
            meta = found.get(topic)
            if meta is not None:  # there, but the broker refuses its metadata (ACLs)
                detail = f"the {role} topic's metadata: {meta.error}"
                fix = f"grant this principal Describe on {topic}"
                out.append(fail(check, detail, fix))
                continue
            fix = _create(topic, 3 if role == "source" else 1)
            out.append(fail(check, f"the {role} topic does not exist", fix))
            continue
        parts = len(found[topic].partitions)
        short = _partitions_short(env, topic, parts) if role == "source" else None
        if short is not None:
            out.append(short)
            continue
        kept = retention.get(topic)
        problem = _retention_problem(topic, kept, need[topic])
        if problem is None:
            out.append(ok(check, f"{role}, {_count(parts)}, retention {_kept(kept)}"))
            continue
        detail, fix = problem
        # Unknown retention, or short on a side output: what is kept is not lost yet.
        make = fail if role == "source" and kept is not None else warn
        out.append(make(check, f"{role}, {_count(parts)}; {detail}", fix))
    out.append(_control(k, found))
    return out


def _count(partitions: int) -> str:
    return f"{partitions} partition{'s' if partitions != 1 else ''}"


def _control(k: KafkaConfig, found: dict[str, Any]) -> Finding:
    if k.control_topic is None:
        return ok("control topic", "none (kafka.control_topic is null: one process per store)")
    check = f"topic {k.control_topic}"
    meta = found.get(k.control_topic)
    if meta is None or meta.error is not None:
        return ok(check, "control, not created yet: `run` creates it (1 partition)")
    n = len(meta.partitions)
    if n != 1:
        return fail(
            check,
            f"control, {n} partitions: the emitter lease needs exactly one",
            f"re-create {k.control_topic} with one partition (no data to keep: claims only)",
        )
    return ok(check, "control, 1 partition")


def _retention(admin: AdminClient, topics: list[str], timeout: float) -> dict[str, int | None]:
    """retention.ms of each topic (-1: for ever); None where the broker does not say."""
    if not topics:
        return {}
    resources = [ConfigResource(ResourceType.TOPIC, t) for t in topics]
    out: dict[str, int | None] = {}
    for resource, future in admin.describe_configs(resources).items():
        try:
            entry = future.result(timeout=timeout).get("retention.ms")
        except KafkaException:  # not allowed to read it: the row says it is unknown
            entry = None
        out[resource.name] = int(entry.value) if entry is not None and entry.value else None
    return out


def _kept(ms: int | None) -> str:
    if ms is None:
        return "not reported"
    return "for ever" if ms < 0 else span(ms / 1000)


def _retention_problem(
    topic: str, kept: int | None, need: tuple[int, str]
) -> tuple[str, str] | None:
    """What is wrong with a topic's retention and the command that mends it, or None."""
    seconds, why = need
    alter = (
        f"kafka-configs.sh --bootstrap-server <broker> --alter --entity-type topics "
        f"--entity-name {topic} --add-config retention.ms={max(seconds * 2, 7 * 86400) * 1000}"
    )
    if kept is None:
        return "the broker does not report retention.ms", f"set it: {alter}"
    if 0 <= kept < seconds * 1000:
        return (
            f"retention {_kept(kept)} is shorter than the {why} ({span(seconds)})",
            f"lengthen it: {alter}",
        )
    return None


def _partitions_short(env: Env, topic: str, partitions: int) -> Finding | None:
    """A FAIL when the store holds ingest state for partitions the topic no longer has
    (re-created with fewer: Kafka never shrinks a topic)."""
    k = env.settings.kafka
    try:
        topic_id = TopicIds(k, env.timeout)(topic)
        had = state_partitions(env.store(env.timeout / 2), k.group_id, topic, topic_id)
    except Exception:
        return None  # the clickhouse row reports an unreadable store
    if had <= partitions:
        return None
    return fail(
        f"topic {topic}",
        f"{partitions} partitions, but the store has ingest state for {had} (group {k.group_id})",
        f"add partitions: kafka-topics.sh --bootstrap-server <broker> --alter --topic {topic} "
        f"--partitions {had}",
    )


def clock_skew(env: Env) -> list[Finding]:
    """This host's clock against the broker's: a probe record on the control topic, which
    `run` creates with message.timestamp.type=LogAppendTime, so the broker stamps it with
    its own clock and says so in the delivery report. The probe is a record nobody acts
    on (claims read back are not work; an epoch is an offset, so one more changes none)."""
    k, name = env.settings.kafka, "clock skew"
    if k.control_topic is None:
        return [ok(name, "not measured: kafka.control_topic is null (nothing to probe)")]
    topic = k.control_topic
    admin = AdminClient(_quiet(k, env.timeout))
    meta = admin.list_topics(timeout=env.timeout).topics.get(topic)
    if meta is None or meta.error is not None:
        return [
            warn(
                name,
                f"not measured: {topic} does not exist yet",
                f"create it as `run` would: kafka-topics.sh --bootstrap-server <broker> "
                f"--create --topic {topic} --partitions 1 "
                "--config message.timestamp.type=LogAppendTime",
            )
        ]
    before = env.clock.now()
    kind, stamp = _probe(k, topic, env.timeout).timestamp()
    after = env.clock.now()
    if kind == TIMESTAMP_LOG_APPEND_TIME:
        return [judge_skew(stamp / 1000, before, after, env.settings)]
    resource = ConfigResource(ResourceType.TOPIC, topic)
    entry = admin.describe_configs([resource])[resource].result(timeout=env.timeout)
    asked = entry.get("message.timestamp.type")
    if asked is not None and asked.value == "LogAppendTime":
        detail = f"not measurable: {topic} asks for LogAppendTime, the broker ignores it"
        return [ok(name, detail)]
    return [
        warn(
            name,
            f"not measured: {topic} keeps producers' timestamps (CreateTime)",
            f"kafka-configs.sh --bootstrap-server <broker> --alter --entity-type topics "
            f"--entity-name {topic} --add-config message.timestamp.type=LogAppendTime",
        )
    ]


def _probe(k: KafkaConfig, topic: str, timeout: float) -> Message:
    conf = producer_config(k)
    conf.update({"log_level": 0, "message.timeout.ms": int(timeout * 1000)})
    return append(Producer(conf), topic, {"doctor": socket.gethostname()}, timeout)


def judge_skew(broker: float, before: float, after: float, settings: Settings) -> Finding:
    """The broker appended the probe between `before` and `after` by this host's clock
    when the two agree; how far outside that it lies is the skew at least. FAIL from
    stripe.session_refresh_margin_seconds on: a session's expiry, which Stripe states in its
    own time, is read against this host's clock."""
    skew = broker - after if broker > after else broker - before if broker < before else 0.0
    trip = f"round trip {(after - before) * 1000:.0f} ms"
    fail_at = settings.stripe.session_refresh_margin_seconds
    side = "ahead of" if skew > 0 else "behind"
    detail = f"broker {span(abs(skew))} {side} this host ({trip})"
    fix = "synchronise this host's clock (NTP, chrony), and the broker's"
    if abs(skew) >= fail_at:
        why = f": past stripe.session_refresh_margin_seconds ({fail_at:g} s)"
        return fail("clock skew", detail + why, fix)
    if abs(skew) >= WARN_SKEW_SECONDS:
        return warn("clock skew", detail, fix)
    return ok("clock skew", detail if skew else f"within the {trip}")
