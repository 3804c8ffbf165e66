"""The card-holder registry: upserts, never deletes, keeps every status change with its time."""

from __future__ import annotations

import csv
import sqlite3
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from broker.cards.csv_import import CardRow
from broker.cards.districts import load_districts
from broker.cards.model import CardStatus
from broker.cards.registry import MIGRATIONS, Registry, derive_status

T0 = datetime(2026, 1, 10, 2, 0, tzinfo=UTC)


def row(number: str, status: str = "active", valid_until: date = date(2030, 1, 1)) -> CardRow:
    return CardRow(number, "h" * 32, date(1950, 1, 1), status, False, False, valid_until)


def test_upsert_never_deletes_and_counts_what_changed(tmp_path: Path):
    reg = Registry(tmp_path / "r.sqlite3")
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


def test_status_at_answers_for_any_instant_in_the_past(tmp_path: Path):
    reg = Registry(tmp_path / "r.sqlite3")
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


def test_district_table_is_seeded_from_the_reference_data(tmp_path: Path):
    reg = Registry(tmp_path / "r.sqlite3")
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
