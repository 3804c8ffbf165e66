"""Citizen ID numbers (GB 11643-1999): the ISO 7064 MOD 11-2 check and the birth date."""

from __future__ import annotations

import re
from datetime import date

_SSN_RE = re.compile(r"[0-9]{17}[0-9X]")
# ISO 7064 MOD 11-2 as GB 11643-1999 applies it.
_SSN_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_SSN_CHECK = "10X98765432"


def ssn_check_character(first17: str) -> str:
    """The ISO 7064 MOD 11-2 check character for the first 17 digits of an ID number."""
    total = sum(int(d) * w for d, w in zip(first17, _SSN_WEIGHTS, strict=True))
    return _SSN_CHECK[total % 11]


def parse_ssn(ssn: str, today: date) -> date:
    """Validate an 18-character citizen ID number (GB 11643) and return the birth date.

    Raises:
        ValueError: with a reason that never repeats the number itself.
    """
    if not _SSN_RE.fullmatch(ssn):
        raise ValueError("ssn must be 17 digits followed by a digit or X")
    if ssn_check_character(ssn[:17]) != ssn[17]:
        raise ValueError("ssn check character is wrong (ISO 7064 MOD 11-2)")
    try:
        born = date(int(ssn[6:10]), int(ssn[10:12]), int(ssn[12:14]))
    except ValueError:
        raise ValueError("ssn birth date is not a real date") from None
    if born > today:
        raise ValueError("ssn birth date is in the future")
    if born.year < 1880:
        raise ValueError("ssn birth date is implausibly early")
    return born
