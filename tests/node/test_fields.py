"""short_id (broker/node/fields.py): the checks of requests' short free-text identifiers."""

from __future__ import annotations

import pytest

from broker.core.errors import InvalidArgument
from broker.node.fields import MAX_ID, short_id


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
    assert short_id("x" * 64, "request_id", required) == "x" * 64
    assert short_id("字" * 64, "request_id", required) == "字" * 64  # characters, not bytes
    with pytest.raises(InvalidArgument) as info:
        short_id("x" * 65, "request_id", required)
    assert info.value.field == "request_id"


@pytest.mark.parametrize("bad", ["g\n1", "\x00", "tab\there", "g1\x7f", "\u200bzero-width"])
@pytest.mark.parametrize("required", [True, False])
def test_non_printable_characters_are_refused_even_when_optional(bad: str, required: bool) -> None:
    with pytest.raises(InvalidArgument) as info:
        short_id(bad, "place_id", required)
    assert info.value.field == "place_id"
    assert bad not in str(info.value)  # the offending value is not echoed back
