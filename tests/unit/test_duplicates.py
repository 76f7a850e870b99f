"""Reading a duplicate-identifier 400: which of the request's events Stripe already holds."""

from __future__ import annotations

from typing import Any

import pytest
import stripe

from consumer.emitter.send import duplicates
from consumer.local.emulator.errors import duplicates as emulator_duplicates

REQUEST = {"uc1e_aa", "uc1e_aa-p1", "uc1e_aa-p2", "uc1e_bb", "uc1e_cc"}


def answer(message: str, code: str | None = "duplicate_meter_event", **fields: Any) -> Any:
    body = {"error": {"type": "invalid_request_error", "code": code, "message": message, **fields}}
    return stripe.InvalidRequestError(  # type: ignore[no-untyped-call]
        message, param=None, code=code, http_status=400, json_body=body
    )


def from_emulator(repeated: list[str], names: str) -> Any:
    """The emulator's own answer, as the SDK would raise it."""
    err = emulator_duplicates(repeated, names)
    message = err.body["error"]["message"]
    return stripe.InvalidRequestError(  # type: ignore[no-untyped-call]
        message, param=None, code=err.code, http_status=err.status, json_body=err.body
    )


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        ("all", {"uc1e_bb", "uc1e_aa-p1", "uc1e_cc"}),
        ("first", {"uc1e_bb"}),
        ("none", set()),
    ],
)
def test_the_emulators_three_forms(names: str, expected: set[str]) -> None:
    err = from_emulator(["uc1e_bb", "uc1e_aa-p1", "uc1e_cc"], names)
    assert duplicates.is_duplicate(err)
    assert duplicates.named(err, REQUEST) == expected


def test_the_form_seen_from_stripe_names_one() -> None:
    err = answer("An event already exists with identifier uc1e_cc.")
    assert duplicates.named(err, REQUEST) == {"uc1e_cc"}


def test_a_part_suffix_is_its_own_identifier_not_its_pushes() -> None:
    assert duplicates.named(answer("identifier uc1e_aa-p2 exists"), REQUEST) == {"uc1e_aa-p2"}
    assert duplicates.named(answer("identifier uc1e_aa exists"), REQUEST) == {"uc1e_aa"}
    assert duplicates.named(answer("identifier 'uc1e_aa-p1'."), REQUEST) == {"uc1e_aa-p1"}


def test_names_outside_the_request_and_prefixes_are_ignored() -> None:
    err = answer("Events already exist with identifiers uc1e_zz, uc1e_b, xuc1e_cc.")
    assert duplicates.named(err, REQUEST) == set()


def test_other_text_fields_of_the_error_are_read_too() -> None:
    err = answer("Duplicate identifiers.", identifiers=["uc1e_bb", "uc1e_cc"], param="uc1e_aa")
    assert duplicates.named(err, REQUEST) == {"uc1e_aa", "uc1e_bb", "uc1e_cc"}


def test_the_code_is_read_from_the_body_when_the_exception_has_none() -> None:
    err = answer("dup", code=None)
    err.json_body["error"]["code"] = "duplicate_identifier"
    assert duplicates.code(err) == "duplicate_identifier"
    assert duplicates.is_duplicate(err)
    assert not duplicates.is_duplicate(answer("bad", code="parameter_invalid"))
