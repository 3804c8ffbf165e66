"""Entitlements by age on a Shanghai day, disability and student status."""

from __future__ import annotations

from datetime import date

from broker.cards.model import Entitlement

_SENIOR_AGES = (
    (60, Entitlement.SENIOR_60),
    (65, Entitlement.SENIOR_65),
    (70, Entitlement.SENIOR_70),
)


def age_on(born: date, day: date) -> int:
    """Completed years on ``day``. A 29 February birthday counts as 1 March in common years."""
    years = day.year - born.year
    if (day.month, day.day) < (born.month, born.day):
        years -= 1
    return years


def entitlements_for(
    born: date, disabled: bool, student: bool, day: date
) -> tuple[Entitlement, ...]:
    """Every entitlement that applies on ``day`` (ages reached that day count)."""
    age = age_on(born, day)
    found = [ent for threshold, ent in _SENIOR_AGES if age >= threshold]
    if disabled:
        found.append(Entitlement.DISABLED)
    if student:
        found.append(Entitlement.STUDENT)
    return tuple(found)
