import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.emitter.plan.identifiers import aggregated_identifier, per_event_identifier


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


def test_a_separator_inside_a_part_cannot_shift_a_boundary() -> None:
    assert per_event_identifier("a", "b\x1fc") != per_event_identifier("a\x1fb", "c")
    assert per_event_identifier("a\x1e", "\x1fc") != per_event_identifier("a", "\x1e\x1fc")
    assert aggregated_identifier("m", "c\x1f60000", 1, 2) != aggregated_identifier(
        "m\x1fc", "60000", 1, 2
    )


# Text made mostly of the separator, the escape and one letter, so boundaries are crowded.
_CROWDED = st.text(alphabet=st.sampled_from("\x1e\x1fa"), max_size=6)


@settings(max_examples=500)
@given(_CROWDED, _CROWDED, _CROWDED, _CROWDED)
def test_per_event_identifiers_differ_whenever_their_parts_do(
    a: str, b: str, c: str, d: str
) -> None:
    assert (per_event_identifier(a, b) == per_event_identifier(c, d)) == ((a, b) == (c, d))


@settings(max_examples=300)
@given(_CROWDED, _CROWDED, _CROWDED, _CROWDED)
def test_aggregated_identifiers_differ_whenever_their_parts_do(
    a: str, b: str, c: str, d: str
) -> None:
    same = aggregated_identifier(a, b, 60_000, 1) == aggregated_identifier(c, d, 60_000, 1)
    assert same == ((a, b) == (c, d))


# Strings as Avro carries them (UTF-8: no lone surrogates), without the two characters.
_PLAIN = st.text(st.characters(codec="utf-8", blacklist_characters="\x1e\x1f"))


@given(_PLAIN, _PLAIN)
def test_ids_without_the_two_control_characters_keep_their_identifiers(name: str, eid: str) -> None:
    # The scheme before escaping: identifiers already stored in the outbox stay matched.
    old = "uc1e_" + hashlib.sha256(f"{name}\x1f{eid}".encode()).hexdigest()[:40]
    assert per_event_identifier(name, eid) == old
