"""broker/node/fields.py: operators' short ids are checked; peers' request ids are replaced.

short_id refuses a malformed gate or place id; trace_id_or_new keeps a W3C trace-id and
replaces anything else (never refusing it), saying only why.
"""

from __future__ import annotations

import pytest

from broker.core.errors import InvalidArgument
from broker.node.fields import (
    MAX_ID,
    is_trace_id,
    new_trace_id,
    short_id,
    trace_id_or_new,
)


def test_a_valid_id_is_returned_unchanged() -> None:
    assert short_id("gate-07 東門", "gate_id", required=True) == "gate-07 東門"


def test_a_required_id_that_is_empty_is_refused_naming_the_field() -> None:
    with pytest.raises(InvalidArgument) as info:
        short_id("", "gate_id", required=True)
    assert info.value.field == "gate_id"
    assert str(info.value).startswith("gate_id: ")
    assert str(MAX_ID) in info.value.reason


def test_an_optional_id_may_be_empty() -> None:
    assert short_id("", "place_id", required=False) == ""


@pytest.mark.parametrize("required", [True, False])
def test_64_characters_are_allowed_and_65_refused(required: bool) -> None:
    assert MAX_ID == 64
    assert short_id("x" * 64, "place_id", required) == "x" * 64
    assert short_id("字" * 64, "place_id", required) == "字" * 64  # characters, not bytes
    with pytest.raises(InvalidArgument) as info:
        short_id("x" * 65, "place_id", required)
    assert info.value.field == "place_id"


@pytest.mark.parametrize("bad", ["g\n1", "\x00", "tab\there", "g1\x7f", "\u200bzero-width"])
@pytest.mark.parametrize("required", [True, False])
def test_non_printable_characters_are_refused_even_when_optional(bad: str, required: bool) -> None:
    with pytest.raises(InvalidArgument) as info:
        short_id(bad, "place_id", required)
    assert info.value.field == "place_id"
    assert bad not in str(info.value)  # the offending value is not echoed back


# --- request ids: W3C trace-ids ----------------------------------------------------------

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"  # the W3C Trace Context example


def test_a_w3c_trace_id_is_kept_as_it_is() -> None:
    assert is_trace_id(TRACE_ID)
    assert trace_id_or_new(TRACE_ID) == (TRACE_ID, None)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "empty"),
        (TRACE_ID + "0", "oversized"),
        ("x" * 10_000, "oversized"),
        ("0" * 32, "malformed"),  # all zeros is W3C's invalid trace-id
        (TRACE_ID.upper(), "malformed"),  # lower-case only
        (TRACE_ID[:-1], "malformed"),
        (TRACE_ID[:-1] + "g", "malformed"),
        (TRACE_ID[:-1] + "\n", "malformed"),
        ("req-42", "malformed"),
        ("110101199003077777", "malformed"),  # an ID number, say
        ("٣" * 32, "malformed"),  # Unicode digits are not hex digits
    ],
)
def test_anything_else_is_replaced_by_a_new_trace_id_and_the_reason_named(
    value: str, reason: str
) -> None:
    assert not is_trace_id(value)
    replaced, why = trace_id_or_new(value)
    assert why == reason
    assert is_trace_id(replaced) and replaced != value


def test_generated_trace_ids_are_valid_and_differ() -> None:
    ids = {new_trace_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(is_trace_id(i) for i in ids)
