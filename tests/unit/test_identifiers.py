from consumer.emitter.identifiers import aggregated_identifier, per_event_identifier


def test_per_event_identifier_is_deterministic_and_meter_scoped() -> None:
    a = per_event_identifier("tokens", "evt-1")
    assert a == per_event_identifier("tokens", "evt-1")
    assert a != per_event_identifier("api_calls", "evt-1")
    assert len(a) <= 100


def test_aggregated_identifier_changes_with_each_part() -> None:
    base = aggregated_identifier("m", "cus_1", 60_000, 1)
    assert base == aggregated_identifier("m", "cus_1", 60_000, 1)
    variants = {
        aggregated_identifier("m2", "cus_1", 60_000, 1),
        aggregated_identifier("m", "cus_2", 60_000, 1),
        aggregated_identifier("m", "cus_1", 120_000, 1),
        aggregated_identifier("m", "cus_1", 60_000, 2),
    }
    assert base not in variants and len(variants) == 4


def test_no_ambiguity_from_joining_parts() -> None:
    assert per_event_identifier("ab", "c") != per_event_identifier("a", "bc")
