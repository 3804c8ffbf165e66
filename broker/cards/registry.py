"""The district's own card-holders, in embedded SQLite.

Holds one row per card (the holder as a keyed hash, the birth date, status,
flags, validity) and the full history of status changes with the instant
each took effect, so that settlement can ask what a card's status was at the
time of travel. ID numbers are never stored: only their keyed hash.

All methods are synchronous and thread-safe; :class:`broker.gate.home.HomeRecognizer`
runs them off the event loop. The file's schema is :data:`MIGRATIONS` (see
:func:`broker.core.db.migrate`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

from broker.cards.csv_import import CardRow
from broker.cards.districts import District, load_districts
from broker.cards.model import CardStatus, shanghai_day
from broker.core.db import Db, Migration, migrate, utc_text

BASELINE = """
CREATE TABLE IF NOT EXISTS districts (
    code TEXT PRIMARY KEY,
    name_zh TEXT NOT NULL,
    name_en TEXT NOT NULL,
    province TEXT NOT NULL,
    relation_to_dazu TEXT NOT NULL,
    historical_codes TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cards (
    card_number TEXT PRIMARY KEY,
    holder_key TEXT NOT NULL,
    birth_date TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'lost', 'suspended')),
    disabled INTEGER NOT NULL,
    student INTEGER NOT NULL,
    valid_until TEXT NOT NULL,
    updated_at TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS cards_holder ON cards (holder_key);
CREATE TABLE IF NOT EXISTS card_status_history (
    id INTEGER PRIMARY KEY,
    card_number TEXT NOT NULL,
    status TEXT NOT NULL,
    valid_until TEXT NOT NULL,
    effective_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS history_card_time ON card_status_history (card_number, effective_at);
"""

MIGRATIONS = (Migration(1, "baseline: districts, cards, card status history", BASELINE),)


@dataclass(frozen=True)
class ImportResult:
    """What an import changed."""

    rows: int
    inserted: int
    updated: int
    status_changes: int
    unchanged: int


def derive_status(stored: str, valid_until: date, day: date) -> CardStatus:
    """The wire status of a card on ``day``: lost/suspended first, then expiry (inclusive)."""
    if stored == "lost":
        return CardStatus.LOST
    if stored == "suspended":
        return CardStatus.SUSPENDED
    if day > valid_until:
        return CardStatus.EXPIRED
    return CardStatus.ACTIVE


class Registry:
    """SQLite-backed card-holder registry of one district."""

    def __init__(self, path: Path) -> None:
        self._db = Db.sqlite(path)
        migrate(self._db, "registry", MIGRATIONS)
        self._seed_districts(load_districts())

    def close(self) -> None:
        self._db.close()

    def _seed_districts(self, districts: Iterable[District]) -> None:
        cols = "code, name_zh, name_en, province, relation_to_dazu, historical_codes"
        rows = [
            (d.code, d.name_zh, d.name_en, d.province, d.relation_to_dazu, d.historical_codes)
            for d in districts
        ]
        if set(self._db.all(f"SELECT {cols} FROM districts")) >= set(rows):
            return  # nothing to change: opening the file writes nothing
        with self._db.write():
            self._db.executemany(
                f"INSERT INTO districts ({cols}) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (code) DO UPDATE SET "
                "name_zh=excluded.name_zh, name_en=excluded.name_en, province=excluded.province, "
                "relation_to_dazu=excluded.relation_to_dazu, "
                "historical_codes=excluded.historical_codes",
                rows,
            )

    def districts(self) -> list[District]:
        """The seeded district table."""
        cols = "code, name_zh, name_en, province, relation_to_dazu, historical_codes"
        return [District(*r) for r in self._db.all(f"SELECT {cols} FROM districts ORDER BY code")]

    def upsert(self, rows: list[CardRow], at: datetime) -> ImportResult:
        """Insert or update every row in one transaction; never deletes.

        A change of status or validity is appended to the history with
        ``at`` as the instant it took effect.
        """
        when = utc_text(at)
        inserted = updated = changes = unchanged = 0
        with self._db.write():
            for r in rows:
                old = self._db.one(
                    "SELECT holder_key, birth_date, status, disabled, student, valid_until "
                    "FROM cards WHERE card_number = ?",
                    (r.card_number,),
                )
                new = (
                    r.holder_key,
                    r.birth_date.isoformat(),
                    r.status,
                    int(r.disabled),
                    int(r.student),
                    r.valid_until.isoformat(),
                )
                if old == new:
                    unchanged += 1
                    continue
                self._db.execute(
                    "INSERT INTO cards (card_number, holder_key, birth_date, status, disabled, "
                    "student, valid_until, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (card_number) DO UPDATE SET holder_key=excluded.holder_key, "
                    "birth_date=excluded.birth_date, status=excluded.status, "
                    "disabled=excluded.disabled, student=excluded.student, "
                    "valid_until=excluded.valid_until, updated_at=excluded.updated_at",
                    (r.card_number, *new, when),
                )
                if old is None:
                    inserted += 1
                else:
                    updated += 1
                if old is None or (old[2], old[5]) != (new[2], new[5]):
                    changes += 1
                    self._db.execute(
                        "INSERT INTO card_status_history "
                        "(card_number, status, valid_until, effective_at) VALUES (?, ?, ?, ?)",
                        (r.card_number, r.status, new[5], when),
                    )
        return ImportResult(len(rows), inserted, updated, changes, unchanged)

    def lookup(self, card_number: str) -> CardRow | None:
        """The stored card (never leaves the node), or ``None`` if this district never issued it."""
        row = self._db.one(
            "SELECT card_number, holder_key, birth_date, status, disabled, student, "
            "valid_until FROM cards WHERE card_number = ?",
            (card_number,),
        )
        if row is None:
            return None
        return CardRow(
            card_number=row[0],
            holder_key=row[1],
            birth_date=date.fromisoformat(row[2]),
            status=row[3],
            disabled=bool(row[4]),
            student=bool(row[5]),
            valid_until=date.fromisoformat(row[6]),
        )

    def status_at(self, card_number: str, at: datetime) -> CardStatus:
        """The card's status at instant ``at`` (``UNKNOWN`` before it was first imported)."""
        row = self._db.one(
            "SELECT status, valid_until FROM card_status_history "
            "WHERE card_number = ? AND effective_at <= ? "
            "ORDER BY effective_at DESC, id DESC LIMIT 1",
            (card_number, utc_text(at)),
        )
        if row is None:
            return CardStatus.UNKNOWN
        return derive_status(row[0], date.fromisoformat(row[1]), shanghai_day(at))

    def count(self) -> int:
        """How many cards are registered."""
        row = self._db.one("SELECT count(*) FROM cards")
        return int(row[0]) if row else 0
