"""Ages on a day and the entitlements they give: 60/65/70 boundaries, 29 February, the flags."""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from broker.cards.entitlements import age_on, entitlements_for
from broker.cards.model import Entitlement

TODAY = date(2026, 11, 28)

S60, S65, S70 = Entitlement.SENIOR_60, Entitlement.SENIOR_65, Entitlement.SENIOR_70


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


def test_age_is_zero_on_the_day_of_birth_and_the_day_before_the_first_birthday():
    born = date(2025, 11, 28)
    assert age_on(born, born) == 0
    assert age_on(born, date(2026, 11, 27)) == 0
    assert age_on(born, TODAY) == 1


def test_age_compares_month_before_day():
    """Born in December: a later day-of-month in an earlier month does not complete the year."""
    born = date(1960, 12, 1)
    assert age_on(born, date(2020, 11, 30)) == 59
    assert age_on(born, date(2020, 12, 1)) == 60
    assert age_on(date(1960, 1, 31), date(2020, 2, 1)) == 60


def test_29_february_births_reach_their_birthday_on_29_february_in_leap_years():
    born = date(1964, 2, 29)
    assert age_on(born, date(2024, 2, 28)) == 59
    assert age_on(born, date(2024, 2, 29)) == 60
    assert age_on(born, date(2024, 3, 1)) == 60


@pytest.mark.parametrize(
    ("years", "held"),
    [
        (60, (S60,)),
        (65, (S60, S65)),
        (70, (S60, S65, S70)),
    ],
)
def test_a_senior_threshold_is_reached_on_the_birthday_itself(years, held):
    born = date(TODAY.year - years, TODAY.month, TODAY.day)
    assert entitlements_for(born, False, False, TODAY) == held
    # The day before that birthday the last threshold is not reached yet.
    assert entitlements_for(born, False, False, TODAY - timedelta(days=1)) == held[:-1]


@pytest.mark.parametrize(
    ("born", "common_year", "before", "reached"),
    [
        # A leap year plus 60 is a leap year, except across a century: 2100 is common.
        (date(2040, 2, 29), 2100, (), (S60,)),
        (date(1960, 2, 29), 2025, (S60,), (S60, S65)),  # 65th birthday falls in 2025
        (date(1956, 2, 29), 2026, (S60, S65), (S60, S65, S70)),  # 70th birthday falls in 2026
    ],
)
def test_29_february_births_reach_a_threshold_on_1_march_in_common_years(
    born, common_year, before, reached
):
    assert entitlements_for(born, False, False, date(common_year, 2, 28)) == before
    assert entitlements_for(born, False, False, date(common_year, 3, 1)) == reached


def test_29_february_births_reach_60_on_29_february_in_a_leap_year():
    born = date(1964, 2, 29)
    assert entitlements_for(born, False, False, date(2024, 2, 28)) == ()
    assert entitlements_for(born, False, False, date(2024, 2, 29)) == (S60,)


def test_the_disabled_flag_adds_disabled_at_any_age():
    assert entitlements_for(date(2020, 1, 1), True, False, TODAY) == (Entitlement.DISABLED,)
    assert entitlements_for(date(1966, 11, 28), True, False, TODAY) == (S60, Entitlement.DISABLED)


def test_the_student_flag_adds_student_at_any_age():
    assert entitlements_for(date(2008, 9, 1), False, True, TODAY) == (Entitlement.STUDENT,)
    assert entitlements_for(date(1950, 1, 1), False, True, TODAY) == (
        S60,
        S65,
        S70,
        Entitlement.STUDENT,
    )


def test_both_flags_together_give_both_once_in_enum_order():
    ents = entitlements_for(date(2005, 6, 1), True, True, TODAY)
    assert ents == (Entitlement.DISABLED, Entitlement.STUDENT)
    everything = entitlements_for(date(1940, 6, 1), True, True, TODAY)
    assert everything == tuple(Entitlement)
    assert len(set(everything)) == len(everything)


def test_without_flags_a_person_under_60_has_no_entitlement():
    assert entitlements_for(date(1966, 11, 29), False, False, TODAY) == ()
    assert entitlements_for(TODAY, False, False, TODAY) == ()


def test_entitlements_follow_the_day_asked_about_not_the_clock():
    born = date(1990, 1, 1)
    assert entitlements_for(born, False, False, TODAY) == ()
    assert entitlements_for(born, False, False, date(2050, 1, 1)) == (S60,)
    assert entitlements_for(born, False, False, date(2060, 1, 1)) == (S60, S65, S70)
