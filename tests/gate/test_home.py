"""Home recognition (broker.gate.home): this district's answer about its own cards.

Against a real registry in ``tmp_path``, filled through the import parser as operations
staff would fill it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from broker.cards.csv_import import CardRow, parse_import
from broker.cards.model import CardRef, CardStatus, Entitlement, Recognition, shanghai_day
from broker.cards.privacy import Hasher
from broker.cards.registry import Registry
from broker.core.errors import InvalidArgument
from broker.gate.config import RecognitionConfig
from broker.gate.home import HomeRecognizer, recognise
from tests.helpers import ssn_for

HOME = "500111"
OTHER = "512021"
HASHER = Hasher(b"h" * 32)
CFG = RecognitionConfig(cache_ttl_seconds=77, unknown_ttl_seconds=3, max_stale_seconds=0)
# 12:00 in Shanghai on 31 March 2026.
NOW = datetime(2026, 3, 31, 4, 0, tzinfo=UTC)
# The last instant of 31 March in Shanghai, and the first of 1 April (still 31 March in UTC).
LAST_OF_MARCH = datetime(2026, 3, 31, 15, 59, 59, tzinfo=UTC)
FIRST_OF_APRIL = datetime(2026, 3, 31, 16, 0, 0, tzinfo=UTC)

E = Entitlement
HEADER = "card_number,ssn,status,disabled,student,valid_until"
ROWS = [
    f"SENIOR0001,{ssn_for(HOME, '19500101')},active,true,false,2030-12-31",
    f"LOST000001,{ssn_for(HOME, '19500101', '556')},lost,false,false,2030-12-31",
    f"SUSP000001,{ssn_for(HOME, '19800101')},suspended,false,true,2030-12-31",
    f"ENDSMARCH1,{ssn_for(HOME, '19500101', '557')},active,false,false,2026-03-31",
    f"LOSTEXPD01,{ssn_for(HOME, '19800101', '556')},lost,false,false,2020-01-01",
    f"TURNS60001,{ssn_for(HOME, '19660401')},active,false,false,2030-12-31",
    f"PLAIN00001,{ssn_for(HOME, '19900101')},active,false,false,2030-12-31",
]


def rows(lines: list[str]) -> list[CardRow]:
    return parse_import([HEADER, *lines], shanghai_day(NOW), HASHER)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = Registry(tmp_path / "registry.sqlite3")
    reg.upsert(rows(ROWS), NOW)
    try:
        yield reg
    finally:
        reg.close()


@pytest.fixture
def home(registry: Registry) -> HomeRecognizer:
    return HomeRecognizer(HOME, registry, CFG)


def ref(number: str) -> CardRef:
    return CardRef(HOME, number)


async def test_an_active_card_gets_its_entitlements_and_the_configured_ttl(home: HomeRecognizer):
    """76 years old and disabled: all three senior entitlements and DISABLED, TTL from config."""
    rec = await home.recognise(ref("SENIOR0001"), NOW)
    assert rec == Recognition(
        CardStatus.ACTIVE, (E.SENIOR_60, E.SENIOR_65, E.SENIOR_70, E.DISABLED), 77
    )


async def test_an_active_card_without_entitlements(home: HomeRecognizer):
    """A 36-year-old with no flags is ACTIVE with no entitlements, not refused."""
    assert await home.recognise(ref("PLAIN00001"), NOW) == Recognition(CardStatus.ACTIVE, (), 77)


@pytest.mark.parametrize(
    ("number", "status"),
    [("LOST000001", CardStatus.LOST), ("SUSP000001", CardStatus.SUSPENDED)],
)
async def test_lost_and_suspended_cards_carry_no_entitlements(
    home: HomeRecognizer, number: str, status: CardStatus
):
    """A holder who would be entitled (senior / student) gets nothing on a refused card."""
    assert await home.recognise(ref(number), NOW) == Recognition(status, (), 77)


async def test_lost_wins_over_expiry(home: HomeRecognizer):
    """A lost card past its validity is reported LOST, not EXPIRED."""
    assert (await home.recognise(ref("LOSTEXPD01"), NOW)).status is CardStatus.LOST


async def test_a_card_expires_after_its_last_day_in_shanghai(home: HomeRecognizer):
    """valid_until is inclusive and counted on the Shanghai day, not the UTC day."""
    last = await home.recognise(ref("ENDSMARCH1"), LAST_OF_MARCH)
    assert last.status is CardStatus.ACTIVE
    assert last.entitlements  # 76 years old: still entitled on the last valid day
    after = await home.recognise(ref("ENDSMARCH1"), FIRST_OF_APRIL)
    assert after == Recognition(CardStatus.EXPIRED, (), 77)


async def test_an_age_threshold_is_reached_on_the_shanghai_birthday(home: HomeRecognizer):
    """Born 1 April 1966: SENIOR_60 from 00:00 Shanghai time on 1 April 2026 (16:00 UTC the day
    before), not earlier."""
    before = await home.recognise(ref("TURNS60001"), LAST_OF_MARCH)
    # ... and the answer without it is kept no longer than the day: 1 s, not 77
    assert before == Recognition(CardStatus.ACTIVE, (), 1)
    on = await home.recognise(ref("TURNS60001"), FIRST_OF_APRIL)
    assert on == Recognition(CardStatus.ACTIVE, (E.SENIOR_60,), 77)


@pytest.mark.parametrize(
    ("at", "ttl"),
    [
        (datetime(2026, 3, 31, 15, 58, 0, tzinfo=UTC), 77),  # 23:58 in Shanghai: 120 s left
        (datetime(2026, 3, 31, 15, 59, 0, tzinfo=UTC), 60),  # 23:59: a minute left
        (datetime(2026, 3, 31, 16, 0, 0, tzinfo=UTC), 77),  # 00:00 on 1 April: a new day
        (datetime(2026, 3, 31, 23, 59, 30, tzinfo=UTC), 77),  # 07:59 in Shanghai, not UTC's eve
    ],
)
async def test_no_answer_may_be_cached_past_midnight_in_shanghai(
    home: HomeRecognizer, at: datetime, ttl: int
):
    assert (await home.recognise(ref("SENIOR0001"), at)).ttl_seconds == ttl
    unknown = await home.recognise(ref("NOSUCH0001"), datetime(2026, 3, 31, 15, 59, 58, tzinfo=UTC))
    assert unknown.ttl_seconds == 2  # the short TTL is bounded the same way


async def test_an_unknown_card_is_unknown_with_the_short_ttl(home: HomeRecognizer):
    """A card this district never issued: UNKNOWN, no entitlements, the short TTL."""
    assert await home.recognise(ref("NOSUCH0001"), NOW) == Recognition(CardStatus.UNKNOWN, (), 3)


async def test_another_districts_card_is_an_invalid_argument(home: HomeRecognizer):
    """Even if the number exists here, a card of another region is refused, naming the field."""
    with pytest.raises(InvalidArgument) as info:
        await home.recognise(CardRef(OTHER, "SENIOR0001"), NOW)
    assert info.value.field == "card.issuer_region"
    assert HOME in info.value.reason
    assert "SENIOR0001" not in str(info.value)


async def test_a_registry_change_is_seen_on_the_next_answer(
    home: HomeRecognizer, registry: Registry
):
    """The home answer reads the registry each time: a card reported lost is LOST at once."""
    assert (await home.recognise(ref("PLAIN00001"), NOW)).status is CardStatus.ACTIVE
    lost = f"PLAIN00001,{ssn_for(HOME, '19900101')},lost,false,false,2030-12-31"
    registry.upsert(rows([lost]), NOW + timedelta(minutes=1))
    assert await home.recognise(ref("PLAIN00001"), NOW) == Recognition(CardStatus.LOST, (), 77)


async def test_a_naive_instant_is_refused_for_a_known_card(home: HomeRecognizer):
    """The Shanghai day cannot be found from a naive datetime: ValueError, not a guess."""
    with pytest.raises(ValueError, match="naive"):
        await home.recognise(ref("SENIOR0001"), datetime(2026, 3, 31, 12, 0))


def test_recognise_derives_student_and_disabled_from_the_flags():
    """The pure function: flags add DISABLED then STUDENT after any senior entitlement."""
    row = CardRow("STUDENT001", "k", date(2008, 5, 1), "active", True, True, date(2030, 1, 1))
    assert recognise(row, NOW, CFG) == Recognition(CardStatus.ACTIVE, (E.DISABLED, E.STUDENT), 77)


def test_recognise_uses_the_given_config_ttls():
    """Both TTLs come from the RecognitionConfig passed in, not from defaults."""
    cfg = RecognitionConfig(cache_ttl_seconds=5, unknown_ttl_seconds=1)
    row = CardRow("LOSTROW001", "k", date(1980, 1, 1), "lost", False, False, date(2030, 1, 1))
    assert recognise(row, NOW, cfg).ttl_seconds == 5
    assert recognise(None, NOW, cfg).ttl_seconds == 1


def test_a_home_honours_its_answers_past_their_ttl_but_never_past_midnight(
    registry: Registry,
):
    cfg = RecognitionConfig(cache_ttl_seconds=120, unknown_ttl_seconds=3, max_stale_seconds=600)
    card = registry.lookup("SENIOR0001")
    noon = recognise(card, NOW, cfg)
    assert (noon.ttl_seconds, noon.max_stale_seconds) == (120, 600)
    late = recognise(card, FIRST_OF_APRIL - timedelta(seconds=300), cfg)  # 5 min to midnight
    assert (late.ttl_seconds, late.max_stale_seconds) == (120, 180)  # both end at midnight
    assert recognise(None, NOW, cfg).max_stale_seconds == 0  # UNKNOWN: asked again soon
    assert cfg.reach_seconds == 720
