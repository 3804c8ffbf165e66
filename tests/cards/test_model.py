"""Card references and their validation, the CardRef repr, and the Shanghai calendar day."""

from __future__ import annotations

import dataclasses
from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from broker.cards.model import (
    SHANGHAI,
    CardRef,
    card_ref,
    shanghai_day,
    validate_card_number,
    validate_region,
)
from broker.core.errors import InvalidArgument


def test_settlement_day_is_the_shanghai_calendar_day():
    assert shanghai_day(datetime(2026, 11, 28, 15, 59, 59, tzinfo=UTC)) == date(2026, 11, 28)
    assert shanghai_day(datetime(2026, 11, 28, 16, 0, 0, tzinfo=UTC)) == date(2026, 11, 29)
    with pytest.raises(ValueError, match="naive"):
        shanghai_day(datetime(2026, 11, 28, 16, 0, 0))


@pytest.mark.parametrize(
    ("region", "number", "field"),
    [
        ("50011", "ABC123456", "card.issuer_region"),
        ("5001110", "ABC123456", "card.issuer_region"),
        ("A00111", "ABC123456", "card.issuer_region"),
        ("500111", "abc123456", "card.card_number"),
        ("500111", "AB12", "card.card_number"),
        ("500111", "A" * 21, "card.card_number"),
    ],
)
def test_malformed_card_refs_name_the_field(region, number, field):
    with pytest.raises(InvalidArgument) as info:
        card_ref(region, number)
    assert info.value.field == field


def test_card_ref_repr_hides_the_number():
    ref = card_ref("500111", "ABC123456")
    assert "ABC123456" not in repr(ref)


def test_card_ref_str_and_containers_hide_the_number_but_show_the_region():
    """f-strings, str() and the repr of a list all go through the redacting repr."""
    ref = card_ref("500111", "ABC123456")
    for text in (str(ref), f"{ref}", repr([ref]), repr({"card": ref})):
        assert "ABC123456" not in text
        assert "500111" in text
        assert "<redacted>" in text


def test_card_refs_are_values_frozen_equal_and_hashable():
    a, b = card_ref("500111", "ABC123456"), CardRef("500111", "ABC123456")
    assert a == b
    assert {a: 1}[b] == 1
    assert a != card_ref("500111", "ABC123457")
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.card_number = "XYZ999999"  # type: ignore[misc]


def test_shanghai_day_converts_from_any_offset():
    """An instant given in New York time belongs to the Shanghai day 13 hours later."""
    new_york = timezone(timedelta(hours=-5))
    assert shanghai_day(datetime(2026, 11, 28, 10, 59, tzinfo=new_york)) == date(2026, 11, 28)
    assert shanghai_day(datetime(2026, 11, 28, 11, 0, tzinfo=new_york)) == date(2026, 11, 29)
    assert shanghai_day(datetime(2026, 11, 28, 0, 0, tzinfo=SHANGHAI)) == date(2026, 11, 28)


@pytest.mark.parametrize("code", ["100000", "500111", "512021", "899999"])
def test_well_formed_division_codes_are_returned_unchanged(code):
    assert validate_region(code) == code


@pytest.mark.parametrize(
    "code",
    ["", "000000", "099999", "900000", "50011 ", " 500111", "500111\n", "５00111", "50011A"],
)
def test_malformed_division_codes_are_refused(code):
    """Division codes start 1-8 (the province groups); anything but six ASCII digits is refused."""
    with pytest.raises(InvalidArgument) as info:
        validate_region(code)
    assert info.value.field == "card.issuer_region"


@pytest.mark.parametrize("number", ["ABC123", "0" * 6, "Z" * 20, "9A8B7C6D5E"])
def test_card_numbers_of_6_to_20_upper_case_characters_are_accepted(number):
    assert validate_card_number(number) == number


@pytest.mark.parametrize(
    "number", ["", "ABC12", "A" * 21, "ABC-123456", "ABC 123456", "ABC123456\n", "ÄBC123456"]
)
def test_malformed_card_numbers_are_refused_without_echoing_them(number):
    with pytest.raises(InvalidArgument) as info:
        validate_card_number(number)
    assert info.value.field == "card.card_number"
    if number:
        assert number.strip() not in str(info.value)


def test_validators_and_card_ref_name_the_field_they_are_given():
    with pytest.raises(InvalidArgument) as info:
        validate_region("1", "trip.origin")
    assert info.value.field == "trip.origin"
    with pytest.raises(InvalidArgument) as info:
        validate_card_number("x", "deny.card_number")
    assert info.value.field == "deny.card_number"
    with pytest.raises(InvalidArgument) as info:
        card_ref("500111", "bad", prefix="trips[3].card")
    assert info.value.field == "trips[3].card.card_number"


def test_card_ref_checks_the_region_before_the_number():
    """With both fields bad, the error names the region: the first field of the message."""
    with pytest.raises(InvalidArgument) as info:
        card_ref("", "")
    assert info.value.field == "card.issuer_region"
