"""Citizen ID numbers (GB 11643-1999): the MOD 11-2 check character and every rejection reason."""

from __future__ import annotations

import random
from datetime import date, timedelta

import pytest

from broker.cards.gb11643 import parse_ssn, ssn_check_character

TODAY = date(2026, 11, 28)
AREA = "500111"


def _iso7064_mod11_2(first17: str) -> str:
    """The check character straight from ISO 7064 MOD 11-2, independent of the module's tables.

    Digit i (from the right, the check character being position 1) weighs 2**(i-1) mod 11, and
    the check value c makes the weighted sum of all 18 characters ≡ 1 (mod 11); 10 is written X.
    """
    total = sum(int(d) * pow(2, 17 - i, 11) for i, d in enumerate(first17))
    c = (1 - total) % 11
    return "X" if c == 10 else str(c)


def _ssn(born: str, seq: str = "555", area: str = AREA) -> str:
    first17 = area + born + seq
    return first17 + _iso7064_mod11_2(first17)


VALID = _ssn("19800115")


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


def test_check_character_agrees_with_iso_7064_on_random_numbers():
    """The weight and remainder tables equal the MOD 11-2 definition, over many inputs."""
    rng = random.Random(11643)
    for _ in range(2000):
        first17 = "".join(rng.choice("0123456789") for _ in range(17))
        assert ssn_check_character(first17) == _iso7064_mod11_2(first17), first17


def test_every_check_character_including_x_is_reachable():
    """All eleven remainders occur, so X (remainder 2) and every digit are produced."""
    rng = random.Random(7064)
    seen: set[str] = set()
    for _ in range(5000):
        seen.add(ssn_check_character("".join(rng.choice("0123456789") for _ in range(17))))
    assert seen == set("0123456789X")


def test_check_character_needs_exactly_17_digits():
    """A short or long prefix is a programming error, not silently truncated."""
    with pytest.raises(ValueError):
        ssn_check_character("1101051949123100")
    with pytest.raises(ValueError):
        ssn_check_character("110105194912310021")


def test_a_valid_number_ending_in_a_digit_gives_its_birth_date():
    ssn = next(n for n in (_ssn("19640229", seq=f"{s:03d}") for s in range(100)) if n[-1] != "X")
    assert parse_ssn(ssn, TODAY) == date(1964, 2, 29)


def test_every_single_digit_substitution_is_caught_by_the_check_character():
    """MOD 11-2 detects any one wrong digit: each is refused as a wrong check character."""
    ssn = VALID
    assert parse_ssn(ssn, TODAY) == date(1980, 1, 15)
    for pos in range(17):
        for digit in "0123456789":
            if digit == ssn[pos]:
                continue
            typo = ssn[:pos] + digit + ssn[pos + 1 :]
            with pytest.raises(ValueError, match="check character"):
                parse_ssn(typo, TODAY)


def test_a_swap_of_two_adjacent_digits_is_caught():
    ssn = _ssn("19800115", seq="123")
    for pos in range(16):
        if ssn[pos] == ssn[pos + 1]:
            continue
        swapped = ssn[:pos] + ssn[pos + 1] + ssn[pos] + ssn[pos + 2 :]
        with pytest.raises(ValueError, match="check character"):
            parse_ssn(swapped, TODAY)


@pytest.mark.parametrize(
    "ssn",
    [
        "",
        "5001111980011555",  # 16 characters
        "50011119800115555",  # 17 characters: the check character is missing
        "5001111980011555512",  # 19 characters
        "50011119800115555x",  # lower-case x
        "X00111198001155550",  # X anywhere but last
        "5001111980011555X0",
        "50011119800115 555",  # a space inside
        " 500111198001155550",
        "500111198001155550\n",  # a trailing newline (a `$`-anchored regex would let it in)
        "５00111198001155550",  # a full-width digit
        "٥00111198001155550",  # an Arabic-Indic digit: int() reads it, the standard does not
        "500111-19800115-555",
    ],
)
def test_wrong_length_or_characters_are_refused_as_malformed(ssn):
    with pytest.raises(ValueError, match="17 digits followed by a digit or X"):
        parse_ssn(ssn, TODAY)


def test_a_wrong_check_character_is_refused():
    ssn = VALID
    wrong = next(c for c in "0123456789X" if c != ssn[-1])
    with pytest.raises(ValueError, match="check character is wrong"):
        parse_ssn(ssn[:17] + wrong, TODAY)


@pytest.mark.parametrize(
    "born",
    [
        "19800230",  # 30 February
        "19800231",
        "19810229",  # 29 February in a common year
        "19000229",  # 1900 is not a leap year (divisible by 100, not by 400)
        "19801301",  # month 13
        "19800001",  # month 0
        "19800100",  # day 0
        "19800431",  # 31 April
        "00000000",
    ],
)
def test_an_impossible_birth_date_is_refused(born):
    with pytest.raises(ValueError, match="not a real date"):
        parse_ssn(_ssn(born), TODAY)


def test_29_february_of_a_leap_year_is_a_real_date():
    assert parse_ssn(_ssn("20000229"), TODAY) == date(2000, 2, 29)
    assert parse_ssn(_ssn("19960229"), TODAY) == date(1996, 2, 29)


def test_a_birth_date_after_today_is_refused_and_today_is_accepted():
    tomorrow = TODAY + timedelta(days=1)
    with pytest.raises(ValueError, match="in the future"):
        parse_ssn(_ssn(tomorrow.strftime("%Y%m%d")), TODAY)
    assert parse_ssn(_ssn(TODAY.strftime("%Y%m%d")), TODAY) == TODAY


def test_the_future_is_judged_against_the_given_day_not_the_clock():
    born = "20300101"
    with pytest.raises(ValueError, match="in the future"):
        parse_ssn(_ssn(born), TODAY)
    assert parse_ssn(_ssn(born), date(2030, 1, 1)) == date(2030, 1, 1)


def test_a_birth_before_1880_is_refused_and_1880_is_accepted():
    with pytest.raises(ValueError, match="implausibly early"):
        parse_ssn(_ssn("18791231"), TODAY)
    with pytest.raises(ValueError, match="implausibly early"):
        parse_ssn(_ssn("00010101"), TODAY)
    assert parse_ssn(_ssn("18800101"), TODAY) == date(1880, 1, 1)


@pytest.mark.parametrize(
    "ssn",
    [
        "50011119800115555",  # malformed
        VALID[:17] + ("0" if VALID[-1] != "0" else "1"),  # wrong check character
        _ssn("19800230"),  # not a real date
        _ssn("20991231"),  # future
        _ssn("18000101"),  # too early
    ],
)
def test_no_rejection_reason_repeats_the_number_or_its_digits(ssn):
    """Reasons reach logs and gRPC details: neither the number nor its birth date may appear."""
    with pytest.raises(ValueError) as info:
        parse_ssn(ssn, TODAY)
    text = str(info.value)
    assert ssn not in text
    assert ssn[:17] not in text
    assert not [ssn[i : i + 6] for i in range(len(ssn) - 5) if ssn[i : i + 6] in text]
