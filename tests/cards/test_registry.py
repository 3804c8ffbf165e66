"""The card-holder registry: upserts, never deletes, keeps every status change with its time."""

from __future__ import annotations

import csv
import sqlite3
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from broker.cards import status_log
from broker.cards.config import RegistryConfig
from broker.cards.csv_import import CardRow, parse_import
from broker.cards.districts import load_districts
from broker.cards.gb11643 import ssn_check_character
from broker.cards.model import CardStatus
from broker.cards.privacy import Hasher
from broker.cards.registry import Recorded, Registry, derive_status
from broker.cards.registry_schema import MIGRATIONS
from broker.core.db import Db, migrate, utc_text
from broker.core.errors import ImportRejected

RegistryAt = Callable[..., RegistryConfig]
T0 = datetime(2026, 1, 10, 2, 0, tzinfo=UTC)


def row(number: str, status: str = "active", valid_until: date = date(2030, 1, 1)) -> CardRow:
    return CardRow(number, "h" * 32, date(1950, 1, 1), status, False, False, valid_until)


def test_upsert_never_deletes_and_counts_what_changed(registry_at: RegistryAt):
    reg = Registry(registry_at())
    first = reg.upsert([row("A00000001"), row("A00000002")], T0)
    assert (first.inserted, first.updated, first.status_changes) == (2, 0, 2)
    second = reg.upsert([row("A00000001", "lost")], T0 + timedelta(days=1))
    assert (second.inserted, second.updated, second.status_changes) == (0, 1, 1)
    again = reg.upsert([row("A00000001", "lost")], T0 + timedelta(days=2))
    assert (again.unchanged, again.status_changes) == (1, 0)
    assert reg.count() == 2
    assert reg.lookup("A00000002") is not None
    lost = reg.lookup("A00000001")
    assert lost is not None and lost.status == "lost"
    reg.close()


def test_status_at_answers_for_any_instant_in_the_past(registry_at: RegistryAt):
    reg = Registry(registry_at())
    reg.upsert([row("A00000001")], T0)
    reg.upsert([row("A00000001", "lost")], T0 + timedelta(days=3))
    reg.upsert([row("A00000001", "active", date(2026, 1, 20))], T0 + timedelta(days=5))
    assert reg.status_at("A00000001", T0 - timedelta(seconds=1)) is CardStatus.UNKNOWN
    assert reg.status_at("A00000001", T0) is CardStatus.ACTIVE
    assert reg.status_at("A00000001", T0 + timedelta(days=3, seconds=-1)) is CardStatus.ACTIVE
    assert reg.status_at("A00000001", T0 + timedelta(days=4)) is CardStatus.LOST
    assert reg.status_at("A00000001", T0 + timedelta(days=6)) is CardStatus.ACTIVE
    # valid_until 2026-01-20 is the last valid day, in Asia/Shanghai.
    assert (
        reg.status_at("A00000001", datetime(2026, 1, 20, 15, 59, tzinfo=UTC)) is CardStatus.ACTIVE
    )
    assert (
        reg.status_at("A00000001", datetime(2026, 1, 20, 16, 0, tzinfo=UTC)) is CardStatus.EXPIRED
    )
    reg.close()


def test_derive_status_puts_lost_and_suspended_before_expiry():
    past = date(2020, 1, 1)
    today = date(2026, 11, 28)
    assert derive_status("lost", past, today) is CardStatus.LOST
    assert derive_status("suspended", past, today) is CardStatus.SUSPENDED
    assert derive_status("active", past, today) is CardStatus.EXPIRED
    assert derive_status("active", today, today) is CardStatus.ACTIVE


def test_district_table_is_seeded_from_the_reference_data(registry_at: RegistryAt):
    reg = Registry(registry_at())
    codes = {d.code: d for d in reg.districts()}
    reg.close()
    for code in ("500111", "500151", "500152", "500153", "500118", "512021"):
        assert code in codes
    assert codes["500111"].name_zh == "大足区"
    assert "500225" in codes["500111"].historical_codes


def test_shipped_district_table_equals_shared_reference_when_present():
    shared = Path(__file__).resolve().parents[3] / "shared" / "reference" / "districts.csv"
    if not shared.exists():
        return  # a checkout without shared/ beside it has only the shipped copy
    with shared.open(encoding="utf-8") as fh:
        expected = [r["code"] for r in csv.DictReader(fh)]
    assert [d.code for d in load_districts()] == expected


def test_the_registry_file_is_versioned_and_a_second_open_writes_nothing(tmp_path: Path):
    path = tmp_path / "registry.sqlite3"
    Registry(path).close()
    first = path.read_bytes()
    with sqlite3.connect(path) as raw:
        versions = raw.execute(
            "SELECT version, name FROM schema_migrations WHERE component = 'registry'"
        ).fetchall()
    assert versions == [(m.version, m.name) for m in MIGRATIONS]
    Registry(path).close()
    assert path.read_bytes() == first  # no district re-seeded, no migration re-run


def test_a_column_a_newer_release_added_to_cards_does_not_stop_this_one(tmp_path: Path):
    path = tmp_path / "registry.sqlite3"
    Registry(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute("ALTER TABLE cards ADD COLUMN added_later TEXT")
        raw.execute("ALTER TABLE card_status_history ADD COLUMN recorded_later TEXT")
    reg = Registry(path)
    try:
        at = datetime(2026, 11, 28, tzinfo=UTC)
        assert reg.upsert([row("CQ0000001"), row("CQ0000002", "lost")], at).inserted == 2
        assert reg.upsert([row("CQ0000001", "suspended")], at).status_changes == 1
        stored = reg.lookup("CQ0000001")
        assert stored is not None and stored.status == "suspended"
        assert reg.status_at("CQ0000002", at) is CardStatus.LOST
    finally:
        reg.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT DISTINCT added_later FROM cards").fetchall() == [(None,)]


# ---------------------------------------------------------------- recorded history and TTL


def test_a_change_counts_from_when_it_took_effect_once_it_is_recorded(registry_at: RegistryAt):
    """As recorded at T: the latest change in effect by T among those recorded by T."""
    reg = Registry(registry_at())
    reg.upsert([row("A00000001")], T0)
    reported, entered = T0 + timedelta(hours=1), T0 + timedelta(hours=5)
    lost = replace(row("A00000001", "lost"), changed_at=reported, recorded_at=entered)
    assert reg.upsert([lost], entered).status_changes == 1
    assert reg.status_at("A00000001", reported) is CardStatus.ACTIVE  # not yet recorded
    assert reg.status_at("A00000001", entered - timedelta(microseconds=1)) is CardStatus.ACTIVE
    assert reg.status_at("A00000001", entered) is CardStatus.LOST
    reg.close()


def test_flags_have_a_history_of_their_own(registry_at: RegistryAt):
    reg = Registry(registry_at())
    student = replace(row("A00000001"), student=True)
    reg.upsert([student], T0)
    ends = T0 + timedelta(days=10)
    reg.upsert([replace(student, student=False, disabled=True, changed_at=ends)], ends)
    assert reg.upsert([replace(row("A00000001"), disabled=True)], ends).unchanged == 1
    assert reg.as_recorded("A00000001", T0) == Recorded(CardStatus.ACTIVE, False, True)
    assert reg.as_recorded("A00000001", ends) == Recorded(CardStatus.ACTIVE, True, False)
    assert reg.as_recorded("A00000001", T0 - timedelta(seconds=1)).status is CardStatus.UNKNOWN
    reg.close()


def test_a_row_with_only_recorded_at_took_effect_then(registry_at: RegistryAt):
    reg = Registry(registry_at())
    entered = T0 + timedelta(hours=2)
    reg.upsert([replace(row("A00000001"), recorded_at=entered)], entered)
    assert reg.status_at("A00000001", entered - timedelta(seconds=1)) is CardStatus.UNKNOWN
    assert reg.status_at("A00000001", entered) is CardStatus.ACTIVE
    reg.close()


def test_answers_between_give_one_answer_per_stretch_as_recorded(registry_at: RegistryAt):
    reg = Registry(registry_at())
    reg.upsert([row("A00000001")], T0)
    minute = timedelta(minutes=1)
    reg.upsert([row("A00000001", "lost")], T0 + 2 * minute)
    reg.upsert([row("A00000001", "active")], T0 + 4 * minute)
    answers = reg.answers_between("A00000001", T0 + minute, T0 + 5 * minute)
    assert [a.status for a in answers] == [CardStatus.ACTIVE, CardStatus.LOST, CardStatus.ACTIVE]
    lost = reg.answers_between("A00000001", T0 + 3 * minute, T0 + 3 * minute)
    assert [a.status for a in lost] == [CardStatus.LOST]
    # A card that expires within the interval was valid at its start.
    last_day = replace(row("A00000002"), valid_until=date(2026, 1, 10))
    reg.upsert([last_day], T0)
    midnight = datetime(2026, 1, 10, 16, 0, tzinfo=UTC)  # 11 January begins in Shanghai
    both = reg.answers_between("A00000002", midnight - minute, midnight + minute)
    assert [a.status for a in both] == [CardStatus.ACTIVE]
    after = reg.answers_between("A00000002", midnight, midnight + minute)
    assert [a.status for a in after] == [CardStatus.EXPIRED]
    reg.close()


def test_the_advertised_ttl_is_recorded_when_it_changes_and_read_for_any_instant(tmp_path: Path):
    path = tmp_path / "r.sqlite3"
    reg = Registry(path)
    assert reg.advertised_ttl_at(T0) == 0  # never advertised: nothing cached
    assert reg.oldest_answer_in_force(T0) == T0
    assert reg.record_advertised_ttl(120, T0)
    assert not reg.record_advertised_ttl(120, T0 + timedelta(days=1))  # unchanged: not written
    assert reg.record_advertised_ttl(30, T0 + timedelta(days=2))
    reg.close()
    reg = Registry(path)
    assert reg.advertised_ttl_at(T0 - timedelta(days=1)) == 120  # before any: the first
    assert reg.advertised_ttl_at(T0 + timedelta(days=2) - timedelta(microseconds=1)) == 120
    assert reg.advertised_ttl_at(T0 + timedelta(days=2)) == 30
    with pytest.raises(ValueError):
        reg.record_advertised_ttl(-1, T0)
    reg.close()


def test_answers_given_under_a_longer_ttl_reach_back_further(registry_at: RegistryAt):
    reg = Registry(registry_at())
    reg.record_advertised_ttl(120, T0)
    lowered = T0 + timedelta(hours=1)
    reg.record_advertised_ttl(30, lowered)
    second = timedelta(seconds=1)
    assert reg.oldest_answer_in_force(T0 + timedelta(minutes=30)) == T0 + timedelta(minutes=28)
    # An answer given just before the TTL was lowered may be cached for 120 s.
    assert reg.oldest_answer_in_force(lowered + 60 * second) == lowered - 60 * second
    assert reg.oldest_answer_in_force(lowered + 200 * second) == lowered + 170 * second
    # A TTL recorded after the instant plays no part, longer or shorter.
    reg.record_advertised_ttl(600, lowered + timedelta(hours=1))
    assert reg.oldest_answer_in_force(lowered + 200 * second) == lowered + 170 * second
    reg.close()


def v1_registry(path: Path) -> None:
    """A registry file as the release with only migration 1 wrote it."""
    db = Db.sqlite(path)
    try:
        migrate(db, "registry", MIGRATIONS[:1])
        with db.write():
            db.execute(
                "INSERT INTO cards VALUES ('A00000001', 'h', '1950-01-01', 'lost', 1, 0, "
                "'2030-01-01', ?)",
                (utc_text(T0 + timedelta(days=3)),),
            )
            for status, at in (("active", T0), ("lost", T0 + timedelta(days=3))):
                db.execute(
                    "INSERT INTO card_status_history (card_number, status, valid_until, "
                    "effective_at) VALUES ('A00000001', ?, '2030-01-01', ?)",
                    (status, utc_text(at)),
                )
    finally:
        db.close()


def test_a_v1_registry_is_migrated_and_its_status_history_kept(tmp_path: Path):
    path = tmp_path / "registry.sqlite3"
    v1_registry(path)
    with sqlite3.connect(path) as raw:
        before = raw.execute("SELECT * FROM card_status_history ORDER BY id").fetchall()
    reg = Registry(path)
    try:
        assert reg.status_at("A00000001", T0) is CardStatus.ACTIVE
        assert reg.status_at("A00000001", T0 + timedelta(days=3)) is CardStatus.LOST
        # Flags were never kept with the history: the card's own are taken for all of it.
        assert reg.as_recorded("A00000001", T0) == Recorded(CardStatus.ACTIVE, True, False)
        assert reg.advertised_ttl_at(T0) == 0
    finally:
        reg.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT * FROM card_status_history ORDER BY id").fetchall() == before
        assert raw.execute("SELECT count(*) FROM card_history").fetchone() == (2,)
        # The previous release, opening the file again, writes a status row of its own...
        raw.execute(
            "INSERT INTO card_status_history (card_number, status, valid_until, effective_at) "
            "VALUES ('A00000001', 'active', '2030-01-01', ?)",
            (utc_text(T0 + timedelta(days=5)),),
        )
    reg = Registry(path)  # ...which this one copies into the history it reads
    try:
        assert reg.status_at("A00000001", T0 + timedelta(days=5)) is CardStatus.ACTIVE
    finally:
        reg.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT count(*) FROM card_history").fetchone() == (3,)


def test_an_import_with_the_back_offices_instants_keeps_them(tmp_path: Path):
    hasher = Hasher(b"k" * 32)
    first = "500111" + "19500101" + "123"
    ssn = first + ssn_check_character(first)
    lines = [
        "card_number,ssn,status,disabled,student,valid_until,changed_at,recorded_at",
        f"A00000001,{ssn},lost,false,false,2030-01-01,"
        "2026-01-10T09:00:00+08:00,2026-01-10T12:30:00+08:00",
    ]
    rows = parse_import(lines, date(2026, 1, 10), hasher)
    reg = Registry(tmp_path / "r.sqlite3")
    reported = datetime(2026, 1, 10, 1, 0, tzinfo=UTC)  # 09:00 in Shanghai
    entered = datetime(2026, 1, 10, 4, 30, tzinfo=UTC)
    reg.upsert(rows, entered)  # every replica imports it as the back office enters it
    assert reg.status_at("A00000001", entered - timedelta(microseconds=1)) is CardStatus.UNKNOWN
    assert reg.status_at("A00000001", entered) is CardStatus.LOST
    reg.close()
    with sqlite3.connect(tmp_path / "r.sqlite3") as raw:
        stored = raw.execute("SELECT changed_at, recorded_at FROM card_history").fetchall()
    assert stored == [(utc_text(reported), utc_text(entered))]


def test_a_change_counts_only_from_its_import_here_however_early_it_was_recorded(
    registry_at: RegistryAt,
):
    """The node's answers change only when it imports the change: a back office that
    recorded the loss at 10:00 but whose file this node took in at 12:00 answered ACTIVE
    until 12:00, and that is the home's delay, not the neighbour's."""
    reg = Registry(registry_at())
    reg.upsert([row("A00000001")], T0)
    recorded, imported = T0 + timedelta(hours=1), T0 + timedelta(hours=3)
    lost = replace(row("A00000001", "lost"), changed_at=recorded, recorded_at=recorded)
    reg.upsert([lost], imported)
    assert reg.status_at("A00000001", imported - timedelta(microseconds=1)) is CardStatus.ACTIVE
    assert reg.status_at("A00000001", imported) is CardStatus.LOST
    kept = reg.db.all(  # the back office's instants kept
        "SELECT changed_at, recorded_at, imported_at FROM card_history WHERE status = 'lost'"
    )
    assert kept == [(utc_text(recorded), utc_text(recorded), utc_text(imported))]
    reg.close()


def test_an_instant_in_the_future_is_refused_with_its_row(tmp_path: Path):
    hasher = Hasher(b"k" * 32)
    first = "500111" + "19500101" + "123"
    ssn = first + ssn_check_character(first)
    lines = [
        "card_number,ssn,status,disabled,student,valid_until,changed_at,recorded_at",
        f"A00000001,{ssn},lost,false,false,2030-01-01,2026-01-11T09:00:00+08:00,",
    ]
    with pytest.raises(ImportRejected) as refused:
        parse_import(lines, date(2026, 1, 10), hasher)
    assert [(e.line, e.reason) for e in refused.value.errors] == [
        (2, "changed_at is in the future (2026-01-11T09:00:00+08:00): refused")
    ]


def test_a_card_and_the_logs_position_are_read_together(registry_at: RegistryAt):
    reg = Registry(registry_at())
    try:
        reg.upsert([row("A00000001")], T0)
        position, card = reg.lookup_with_position("A00000001")
        assert position == status_log.head(reg.db) and position.seq == 1
        assert card == reg.lookup("A00000001")
        reg.upsert([row("A00000001", "lost")], T0 + timedelta(hours=1))
        position, card = reg.lookup_with_position("A00000001")
        assert position.seq == 2 and card is not None and card.status == "lost"
        assert reg.lookup_with_position("B00000001") == (position, None)  # not ours
    finally:
        reg.close()
