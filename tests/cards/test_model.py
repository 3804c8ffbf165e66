"""Card references, GB 11643 ID numbers, ages and entitlements."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from broker.cards.entitlements import age_on, entitlements_for
from broker.cards.gb11643 import parse_ssn, ssn_check_character
from broker.cards.model import Entitlement, card_ref, shanghai_day
from broker.core.errors import InvalidArgument

TODAY = date(2026, 11, 28)


def test_check_character_matches_the_standards_worked_example():
    # GB 11643-1999's own example number ends in X.
    assert ssn_check_character("11010519491231002") == "X"
    assert parse_ssn("11010519491231002X", TODAY) == date(1949, 12, 31)


@pytest.mark.parametrize(
    ("ssn", "reason"),
    [
        ("110105194912310021", "check character"),
        ("11010519491331002X", "not a real date"),
        ("1101051949123100", "17 digits"),
        ("11010519491231002x1", "17 digits"),
        ("110105203012310020", "future"),
    ],
)
def test_bad_ssn_is_refused_with_a_reason_that_does_not_echo_it(ssn, reason):
    first17 = ssn[:17]
    if reason == "future" or reason == "not a real date":
        ssn = first17 + ssn_check_character(first17)
    with pytest.raises(ValueError, match=reason) as info:
        parse_ssn(ssn, TODAY)
    assert ssn not in str(info.value)


def test_age_counts_the_birthday_itself_and_feb_29_as_march_1():
    assert age_on(date(1966, 11, 28), TODAY) == 60
    assert age_on(date(1966, 11, 29), TODAY) == 59
    assert age_on(date(1964, 2, 29), date(2025, 2, 28)) == 60
    assert age_on(date(1964, 2, 29), date(2025, 3, 1)) == 61


def test_a_72_year_old_holds_all_three_senior_entitlements():
    ents = entitlements_for(date(1954, 1, 1), disabled=True, student=False, day=TODAY)
    assert ents == (
        Entitlement.SENIOR_60,
        Entitlement.SENIOR_65,
        Entitlement.SENIOR_70,
        Entitlement.DISABLED,
    )
    assert entitlements_for(date(2010, 5, 5), False, True, TODAY) == (Entitlement.STUDENT,)
    assert entitlements_for(date(1966, 11, 29), False, False, TODAY) == ()


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
