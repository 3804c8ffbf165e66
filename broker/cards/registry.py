"""The district's own card-holders, in embedded SQLite or, for replicas on several hosts,
in PostgreSQL (``[registry] url``; the same tables in the district's schema).

Holds one row per card (the holder as a keyed hash, the birth date, status,
flags, validity) and the full history of its changes, each with two instants:
``changed_at``, when it took effect (a loss: when it was reported), and
``recorded_at``, when this district's back office recorded it (the import
file may say; else the import's instant), kept beside ``imported_at``, when
this registry took it in. The card *as recorded at* an instant T is its
latest change with ``changed_at`` ≤ T among those recorded *and* imported by
T: what the home district could have answered at T (its answers change only
at an import). It also
keeps the recognition TTL the district advertised to its peers, with the
instants it applied from. Together they let settlement judge a line by the
answers a gate may still have held at the time of travel (see
:meth:`Registry.answers_between`). ID numbers are never stored: only their
keyed hash.

``card_status_history`` (status and validity only, one instant) is still
written for the previous release; ``card_history`` is read. Rows the previous
release wrote to the former after this one migrated the file are copied into
the latter when the file is next opened here, with the card's flags of then.

All methods are synchronous and thread-safe; :class:`broker.gate.home.HomeRecognizer`
runs them off the event loop. The file's schema is :data:`MIGRATIONS` (see
:func:`broker.core.db.migrate`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from broker.cards import status_log
from broker.cards.config import RegistryConfig
from broker.cards.csv_import import CardRow
from broker.cards.districts import District, load_districts
from broker.cards.model import CardStatus, LogPosition, shanghai_day
from broker.cards.registry_schema import MIGRATIONS
from broker.core.db import Db, migrate, utc_text
from broker.core.errors import ConfigError

# When a change was recorded both by the back office and here (portable: no scalar max()).
_KNOWN = (
    "CASE WHEN imported_at IS NOT NULL AND imported_at > recorded_at "
    "THEN imported_at ELSE recorded_at END"
)

# Status rows not yet in card_history (all of them, the first time), with the
# card's flags of now: the previous release judged entitlements by those too.
_COPY_STATUS_ROWS = (
    "INSERT INTO card_history (card_number, status, valid_until, disabled, student, "
    "changed_at, recorded_at, status_history_id, imported_at) "
    "SELECT h.card_number, h.status, h.valid_until, coalesce(c.disabled, 0), "
    "coalesce(c.student, 0), h.effective_at, h.effective_at, h.id, h.effective_at "
    "FROM card_status_history h LEFT JOIN cards c ON c.card_number = h.card_number "
    "WHERE h.id > ? ORDER BY h.id"
)


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


@dataclass(frozen=True, slots=True)
class Recorded:
    """A card as the registry had recorded it at some instant: the answer it could give then."""

    status: CardStatus
    disabled: bool
    student: bool


@dataclass(frozen=True, slots=True)
class CardChange:
    id: int
    status: str
    valid_until: date
    disabled: bool
    student: bool
    changed_at: datetime
    recorded_at: datetime

    @property
    def known_from(self) -> datetime:
        """The first instant at which the registry had it and it was in effect."""
        return max(self.changed_at, self.recorded_at)


def _as_recorded(changes: list[CardChange], at: datetime) -> Recorded:
    seen = [c for c in changes if c.changed_at <= at and c.recorded_at <= at]
    if not seen:
        return Recorded(CardStatus.UNKNOWN, False, False)
    last = max(seen, key=lambda c: (c.changed_at, c.id))
    status = derive_status(last.status, last.valid_until, shanghai_day(at))
    return Recorded(status, last.disabled, last.student)


class Registry:
    """The card-holder registry of one district, in a SQLite file or a PostgreSQL schema."""

    def __init__(self, where: RegistryConfig | Path) -> None:
        """``where``: the ``[registry]`` section, or just a SQLite file."""
        # Other threads and processes (the feed, the home's verifier) open their own
        # connections to the same place: :func:`connect`.
        self.where = where if isinstance(where, RegistryConfig) else RegistryConfig(where)
        self._db = connect(self.where)
        migrate(self._db, "registry", MIGRATIONS)
        self._seed_districts(load_districts())
        self._copy_status_rows()

    @property
    def path(self) -> Path:
        """The SQLite file (a PostgreSQL registry has none: :attr:`where` says where it is)."""
        if self.where.path is None or self.where.url:
            raise ConfigError("this registry is on PostgreSQL: it has no file")
        return self.where.path

    @property
    def db(self) -> Db:
        """The registry's connection (:mod:`broker.cards.status_change`, :mod:`.status_log`)."""
        return self._db

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

    def _copy_status_rows(self) -> None:
        """Bring status rows written without ``card_history`` (see the module docstring) into it."""
        row = self._db.one(
            "SELECT (SELECT coalesce(max(id), 0) FROM card_status_history), "
            "(SELECT coalesce(max(status_history_id), 0) FROM card_history)"
        )
        if row is None or row[0] <= row[1]:
            return  # nothing to copy: opening the file writes nothing
        with self._db.write():
            self._db.execute(_COPY_STATUS_ROWS, (row[1],))

    def districts(self) -> list[District]:
        """The seeded district table."""
        cols = "code, name_zh, name_en, province, relation_to_dazu, historical_codes"
        return [District(*r) for r in self._db.all(f"SELECT {cols} FROM districts ORDER BY code")]

    def upsert(self, rows: list[CardRow], at: datetime) -> ImportResult:
        """Insert or update every row in one transaction; never deletes.

        A change of status, validity or flags (and every new card) is appended
        to the history, as taking effect at the row's ``changed_at`` and
        recorded at its ``recorded_at``. Without them both are ``at``, the
        import's instant; a row with only ``recorded_at`` took effect then.
        """
        when = utc_text(at)
        inserted = updated = changes = unchanged = logged = 0
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
                recorded = utc_text(r.recorded_at or at)
                changed = utc_text(r.changed_at or r.recorded_at or at)
                status_row = None
                if old is None or (old[2], old[5]) != (new[2], new[5]):
                    changes += 1
                    status_row = insert_status_row(
                        self._db, r.card_number, r.status, new[5], changed
                    )
                if old is None or old[2:] != new[2:]:
                    self._db.execute(
                        "INSERT INTO card_history (card_number, status, valid_until, disabled, "
                        "student, changed_at, recorded_at, status_history_id, imported_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            r.card_number,
                            r.status,
                            new[5],
                            new[3],
                            new[4],
                            changed,
                            recorded,
                            status_row,
                            when,
                        ),
                    )
                if old is None or old[1:] != new[1:]:
                    # Peers that asked are told (a birth date corrected changes the
                    # entitlements their cached answers carry, too); in this transaction.
                    wire = derive_status(r.status, r.valid_until, shanghai_day(at))
                    took_effect = r.changed_at or r.recorded_at or at
                    status_log.append(
                        self._db, r.card_number, wire, took_effect, r.recorded_at or at, at
                    )
                    logged += 1
            if logged:
                status_log.announce(self._db)
        return ImportResult(len(rows), inserted, updated, changes, unchanged)

    def lookup(self, card_number: str) -> CardRow | None:
        """The stored card (never leaves the node), or ``None`` if this district never issued it."""
        row = self._db.one(f"SELECT {_CARD} FROM cards WHERE card_number = ?", (card_number,))
        return None if row is None else card_from_row(row)

    def lookup_with_position(self, card_number: str) -> tuple[LogPosition, CardRow | None]:
        """The card and the status log's position, read by one statement (one state of the
        registry): an answer that carries a position shows every change up to it."""
        row = self._db.one(
            f"SELECT l.epoch, l.head, l.mark, {_CARD_OF_C} "
            "FROM status_log l LEFT JOIN cards c ON c.card_number = ? WHERE l.id = 1",
            (card_number,),
        )
        if row is None:
            raise RuntimeError("status_log has no counter row: the registry was not migrated")
        position = LogPosition(str(row[0]), int(row[1]), str(row[2]))
        return position, None if row[3] is None else card_from_row(row[3:])

    def _changes(self, card_number: str, until: datetime) -> list[CardChange]:
        """The card's changes the registry had, in effect, by ``until``."""
        text = utc_text(until)
        # Recorded: by the back office (recorded_at) *and* here (imported_at). The node's
        # own answers change only at the import, so a back-dated recorded_at never moves
        # the delay before it onto a neighbour's operator.
        rows = self._db.all(
            f"SELECT id, status, valid_until, disabled, student, changed_at, {_KNOWN} "
            f"FROM card_history WHERE card_number = ? AND changed_at <= ? AND {_KNOWN} <= ?",
            (card_number, text, text),
        )
        return [
            CardChange(
                int(r[0]),
                r[1],
                date.fromisoformat(r[2]),
                bool(r[3]),
                bool(r[4]),
                datetime.fromisoformat(r[5]),
                datetime.fromisoformat(r[6]),
            )
            for r in rows
        ]

    def as_recorded(self, card_number: str, at: datetime) -> Recorded:
        """The card as recorded at instant ``at`` (``UNKNOWN`` before it was first recorded)."""
        return _as_recorded(self._changes(card_number, at), at)

    def status_at(self, card_number: str, at: datetime) -> CardStatus:
        """The card's status as recorded at instant ``at``."""
        return self.as_recorded(card_number, at).status

    def history(self, card_number: str) -> list[CardChange]:
        """Every change of the card the registry holds (for :func:`answers_between`): a
        batch's checker reads it once per card rather than once per line."""
        return self._changes(card_number, datetime.max.replace(tzinfo=UTC))

    def answers_between(self, card_number: str, start: datetime, end: datetime) -> list[Recorded]:
        """Every answer the registry could have given about the card during ``[start, end]``.

        The card as recorded changes only when a change becomes known (both in
        effect and recorded) and, for expiry, at a Shanghai midnight; one
        answer is given per stretch between changes, as of its first instant,
        so that a card valid at any instant of the stretch is ACTIVE in it.
        """
        return answers_between(self._changes(card_number, end), start, end)

    # ------------------------------------------------------------ advertised TTL

    def record_advertised_ttl(self, ttl_seconds: int, now: datetime) -> bool:
        """Record that peers are told to cache answers ``ttl_seconds`` from ``now`` on.

        Only a change is recorded, so a node may call this every time it
        starts. Whether anything was written.
        """
        if ttl_seconds < 0:
            raise ValueError("an advertised TTL is never negative")
        last = self._db.one("SELECT ttl_seconds FROM advertised_ttl ORDER BY since DESC LIMIT 1")
        if last is not None and int(last[0]) == ttl_seconds:
            return False
        with self._db.write():
            self._db.execute(
                "INSERT INTO advertised_ttl (since, ttl_seconds) VALUES (?, ?) "
                "ON CONFLICT (since) DO UPDATE SET ttl_seconds = excluded.ttl_seconds",
                (utc_text(now), ttl_seconds),
            )
        return True

    def advertised_ttls(self) -> list[tuple[datetime, int]]:
        """Every advertised TTL with the instant it applied from, oldest first.

        A batch's checker reads them once (:func:`oldest_answer_in_force`), not per line.
        """
        rows = self._db.all("SELECT since, ttl_seconds FROM advertised_ttl ORDER BY since")
        return [(datetime.fromisoformat(r[0]), int(r[1])) for r in rows]

    def advertised_ttl_at(self, at: datetime) -> int:
        """The TTL advertised at ``at``: before the first record, the first; 0 if none."""
        ttls = self.advertised_ttls()
        value = ttls[0][1] if ttls else 0
        for since, ttl in ttls:
            if since > at:
                break
            value = ttl
        return value

    def oldest_answer_in_force(self, at: datetime) -> datetime:
        """The earliest instant whose answer a gate may still have held from its cache at ``at``
        (:func:`oldest_answer_in_force` over this registry's advertised TTLs)."""
        return oldest_answer_in_force(self.advertised_ttls(), at)

    def count(self) -> int:
        """How many cards are registered."""
        row = self._db.one("SELECT count(*) FROM cards")
        return int(row[0]) if row else 0


_CARD = "card_number, holder_key, birth_date, status, disabled, student, valid_until"
_CARD_OF_C = ", ".join(f"c.{column}" for column in _CARD.split(", "))


def card_from_row(row: tuple[Any, ...]) -> CardRow:
    return CardRow(
        card_number=row[0],
        holder_key=row[1],
        birth_date=date.fromisoformat(row[2]),
        status=row[3],
        disabled=bool(row[4]),
        student=bool(row[5]),
        valid_until=date.fromisoformat(row[6]),
    )


def insert_status_row(db: Db, card: str, status: str, valid_until: str, at: str) -> int:
    """Write the previous release's status row (inside ``db.write()``); its id."""
    rows = db.all(
        "INSERT INTO card_status_history (card_number, status, valid_until, effective_at) "
        "VALUES (?, ?, ?, ?) RETURNING id",
        (card, status, valid_until, at),
    )
    return int(rows[0][0])


def connect(where: RegistryConfig) -> Db:
    """A new connection to the registry ``where`` names: its SQLite file, or its
    PostgreSQL schema (for the threads and processes that read it beside the node's)."""
    if where.url:
        return Db.postgres(where.url, where.schema, "registry")
    assert where.path is not None  # RegistryConfig holds one or the other
    return Db.sqlite(where.path)


def oldest_answer_in_force(ttls: list[tuple[datetime, int]], at: datetime) -> datetime:
    """The earliest instant whose answer a gate may still have held from its cache at ``at``.

    An answer given at instant s may be cached for the TTL advertised at s
    (``ttls``: :meth:`Registry.advertised_ttls`), so ``at`` minus the TTL
    advertised at ``at`` when it never changed; when it was lowered shortly
    before ``at``, answers given under the longer one may reach further back.
    TTLs recorded after ``at`` play no part.
    """
    oldest = at
    for i, (since, ttl) in enumerate(ttls):
        # The period [since, next since) in which ``ttl`` applied; the first reaches back.
        given = at - timedelta(seconds=ttl)
        if i > 0:
            given = max(given, since)
        if i + 1 < len(ttls) and given >= ttls[i + 1][0]:
            continue  # no answer of this period was still cached at ``at``
        if given <= at:
            oldest = min(oldest, given)
    return oldest


def answers_between(changes: list[CardChange], start: datetime, end: datetime) -> list[Recorded]:
    """:meth:`Registry.answers_between` over a card's ``changes`` (:meth:`Registry.history`)."""
    starts = sorted({start} | {c.known_from for c in changes if start < c.known_from <= end})
    return [_as_recorded(changes, at) for at in starts]
