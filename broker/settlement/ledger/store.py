"""The ledger: one store over :class:`broker.core.db.Db`, in SQLite (the default) or PostgreSQL.

Trips are keyed by (operator_id, trip_id). Recording a batch is one
transaction, committed (``synchronous=FULL`` on SQLite) before the caller may
acknowledge anything, so an acknowledged trip survives a crash and a
resubmitted one is found again: the same content gets the stored outcome
back, other content under the same id is a conflict and changes nothing.
Instants are stored in UTC (text on SQLite, ``timestamptz`` on PostgreSQL);
the settlement day (Asia/Shanghai) is computed in Python and stored beside them.

``ingest_seq`` grows in commit order, which is what lets a period close take
"everything up to here" (broker.settlement.clearing): on SQLite writers are
serialised by ``BEGIN IMMEDIATE`` and the next number is taken inside the
transaction; on PostgreSQL a ``bigserial`` fills it and a close locks the
table (:meth:`broker.core.db.Db.lock_trips`).
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import cast

from broker.cards.model import shanghai_day
from broker.core.db import Db, Migration, migrate, utc_text
from broker.core.planner import Statistics
from broker.settlement.ledger import common
from broker.settlement.ledger.common import TRIP_COLUMNS, resubmitted, trip_from_row
from broker.settlement.trips import (
    ACCEPT,
    DEFAULT_DUPLICATE_WINDOW,
    Judgement,
    Outcome,
    Reason,
    Trip,
)

_TRIPS = """
CREATE TABLE IF NOT EXISTS trips (
    operator_id TEXT NOT NULL,
    trip_id TEXT NOT NULL,
    digest TEXT NOT NULL,
    issuer_region TEXT NOT NULL,
    card_number TEXT NOT NULL,
    scene INTEGER NOT NULL,
    place_id TEXT NOT NULL,
    occurred_at {instant} NOT NULL,
    settlement_day {day} NOT NULL,
    gross_fare_fen {money} NOT NULL,
    charged_fen {money} NOT NULL,
    concession_fen {money} NOT NULL,
    applied_entitlement INTEGER NOT NULL,
    fare_version TEXT NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    received_at {instant} NOT NULL,
    ingest_seq {seq},
    PRIMARY KEY (operator_id, trip_id)
);
CREATE INDEX IF NOT EXISTS trips_day ON trips (settlement_day, issuer_region, outcome)
"""

MIGRATIONS = (
    Migration(
        1,
        "baseline: trips",
        _TRIPS.format(instant="TEXT", day="TEXT", money="INTEGER", seq="INTEGER NOT NULL")
        + ";\nCREATE UNIQUE INDEX IF NOT EXISTS trips_ingest ON trips (ingest_seq)",
        _TRIPS.format(
            instant="timestamptz", day="date", money="bigint", seq="bigserial NOT NULL UNIQUE"
        ),
    ),
    Migration(
        2,
        "sealed days: a day closed after its late window takes no more trips",
        "CREATE TABLE IF NOT EXISTS sealed_days (settlement_day TEXT PRIMARY KEY, "
        "watermark BIGINT NOT NULL, sealed_at TEXT NOT NULL)",
    ),
    Migration(
        3,
        "gate ids: the gate of each trip that has one; taps looked up by card and time",
        # A table of its own, not a column of trips: every row the previous
        # release wrote reads back exactly as it was (tests/e2e/test_db_fixtures.py).
        "CREATE TABLE IF NOT EXISTS trip_gates (operator_id TEXT NOT NULL, "
        "trip_id TEXT NOT NULL, gate_id TEXT NOT NULL, PRIMARY KEY (operator_id, trip_id));\n"
        "CREATE INDEX IF NOT EXISTS trips_card_time ON trips (operator_id, card_number, "
        "occurred_at)",
    ),
    Migration(
        4,
        "decision sources: where each trip's gate decision came from, beside its gate",
        # In trip_gates, which the previous release never knew: its inserts into trips name
        # no columns (tests/e2e/test_db_fixtures.py). A row per trip with a gate or a source.
        "ALTER TABLE trip_gates ADD COLUMN decision_source INTEGER NOT NULL DEFAULT 0",
    ),
)

# Every column but ingest_seq, which PostgreSQL's sequence fills.
_COLUMNS = (
    "operator_id, trip_id, digest, issuer_region, card_number, scene, place_id, occurred_at, "
    "settlement_day, gross_fare_fen, charged_fen, concession_fen, applied_entitlement, "
    "fare_version, outcome, reason, detail, received_at"
)
_MARKS = ", ".join("?" * 18)
_CONFLICT = " ON CONFLICT (operator_id, trip_id) DO NOTHING"
_INSERT = f"INSERT INTO trips ({_COLUMNS}) VALUES ({_MARKS})" + _CONFLICT
_INSERT_SEQ = f"INSERT INTO trips ({_COLUMNS}, ingest_seq) VALUES ({_MARKS}, ?)" + _CONFLICT
_GATE = (
    "INSERT INTO trip_gates (operator_id, trip_id, gate_id, decision_source) "
    "VALUES (?, ?, ?, ?)" + _CONFLICT
)
# After a batch redone row by row: the gate and source of a trip stored now or before with
# this content (the digest counts both), never of another trip stored under the same id.
_GATE_IF_STORED = (
    "INSERT INTO trip_gates (operator_id, trip_id, gate_id, decision_source) "
    "SELECT ?, ?, ?, ? WHERE EXISTS "
    "(SELECT 1 FROM trips WHERE operator_id = ? AND trip_id = ? AND digest = ?)" + _CONFLICT
)
_CARDS_PER_QUERY = 500
Stored = tuple[str, str, str, str]  # a stored trip's digest, outcome, reason and detail


class SqlLedger:
    """Thread-safe; meant to be driven from one writer thread (see broker.settlement.intake)."""

    def __init__(self, db: Db, duplicate_window: timedelta = DEFAULT_DUPLICATE_WINDOW) -> None:
        """``duplicate_window``: see :meth:`_not_again` (``[settlement] duplicate_window_s``)."""
        self._db = db
        self._window = duplicate_window
        migrate(db, "ledger", MIGRATIONS)
        # PostgreSQL plans lookups of ids by them; told of the rows each record added.
        self._trip_stats = Statistics(db, "trips")
        self._gate_stats = Statistics(db, "trip_gates")
        self._added = self._gated = 0

    def close(self) -> None:
        self._db.close()

    def record(
        self, judged: list[tuple[Trip, Judgement]], received_at: datetime
    ) -> list[Judgement]:
        """Store each judged trip unless its id is known; return each trip's final outcome.

        The common case, no id known yet, is one ``executemany``; when some id
        is known the batch is redone row by row to answer each resubmission.
        """
        self._added = self._gated = 0
        out = self._record(judged, received_at)
        self._trip_stats.grew(self._added)  # after the commit: the analysis is a moment's lock
        self._gate_stats.grew(self._gated)
        return out

    def _record(
        self, judged: list[tuple[Trip, Judgement]], received_at: datetime
    ) -> list[Judgement]:
        when = self._db.instant(received_at)
        with self._db.write():
            judged = self._unsealed(judged)
            judged = self._not_again(judged)
            rows = [self._row(t, v, when) for t, v in judged]
            insert = _INSERT
            if self._db.dialect == "sqlite":
                row = self._db.one("SELECT coalesce(max(ingest_seq), 0) FROM trips")
                top = int(row[0]) if row else 0
                rows = [(*r, top + i + 1) for i, r in enumerate(rows)]
                insert = _INSERT_SEQ
            self._db.execute("SAVEPOINT fresh")
            if self._db.executemany(insert, rows) == len(rows):
                self._db.execute("RELEASE fresh")
                self._added = len(rows)
                self._gated = self._db.executemany(
                    _GATE, [common.gate_row(t) for t, _ in judged if common.has_gate(t)]
                )
                return [v for _, v in judged]
            self._db.execute("ROLLBACK TO fresh")
            self._db.execute("RELEASE fresh")
            out = self._resubmission(insert, rows, judged)
            self._gated = self._db.executemany(
                _GATE_IF_STORED,
                [
                    (*common.gate_row(t), t.operator_id, t.trip_id, t.digest())
                    for t, _ in judged
                    if common.has_gate(t)
                ],
            )
            return out

    def _unsealed(self, judged: list[tuple[Trip, Judgement]]) -> list[tuple[Trip, Judgement]]:
        """Inside the write: a trip of a sealed day is too late, whatever intake's clock said.

        Sealed means a close ran after the day's late window (and so before any
        confirmation): the day's figures are final and no new trip may change them.
        """
        if not judged:
            return judged
        if self._db.dialect == "postgres":  # a sealing close holds EXCLUSIVE until it commits
            self._db.execute("LOCK TABLE trips IN ROW EXCLUSIVE MODE")
        try:  # shanghai_day never goes back as time goes on: the earliest trip's day is first
            first = shanghai_day(min(t.occurred_at for t, _ in judged)).isoformat()
        except TypeError:  # naive and aware instants mixed: shanghai_day refuses the naive one
            first = min(shanghai_day(t.occurred_at) for t, _ in judged).isoformat()
        sealed = {
            str(r[0])
            for r in self._db.all(
                "SELECT settlement_day FROM sealed_days WHERE settlement_day >= ?", (first,)
            )
        }
        if not sealed:
            return judged
        out = []
        for t, v in judged:
            day = shanghai_day(t.occurred_at).isoformat()
            if v.outcome is Outcome.ACCEPTED and day in sealed:
                v = Judgement(Outcome.REJECTED, Reason.TOO_LATE, f"day {day} is closed for good")
            out.append((t, v))
        return out

    def _not_again(self, judged: list[tuple[Trip, Judgement]]) -> list[tuple[Trip, Judgement]]:
        """Inside the write: the same tap accepted under another trip id is a suspected duplicate.

        The same operator, card, gate and place with ``occurred_at`` at most the
        duplicate window apart (either way) of an accepted trip, stored or earlier
        in this batch, is refused ``suspected_duplicate``: a gate that uploads a
        tap twice under two ids would otherwise bill it twice. A trip without a
        gate id cannot be told from a second tap and is never refused; a window
        of 0 turns the check off. A trip id already stored is never compared with
        itself (a resubmission gets its stored outcome, :meth:`record`).
        """
        window = self._window
        gated = [t for t, v in judged if t.gate_id and v.outcome is Outcome.ACCEPTED]
        if window <= timedelta(0) or not gated:
            return judged
        seen = self._accepted_taps(gated, window)
        stored = self._stored_ids(gated)  # they keep their stored outcome: not a tap of this one
        out = []
        for t, v in judged:
            if (
                t.gate_id
                and v.outcome is Outcome.ACCEPTED
                and (t.operator_id, t.trip_id) not in stored
            ):
                taps = seen[common.tap_of(t)]
                first = next(
                    (
                        (other, at)
                        for at, other in taps
                        if other != t.trip_id and abs(at - t.occurred_at) <= window
                    ),
                    None,
                )
                if first is None:
                    taps.append((t.occurred_at, t.trip_id))
                else:
                    apart = abs(first[1] - t.occurred_at).total_seconds()
                    v = Judgement(
                        Outcome.REJECTED,
                        Reason.SUSPECTED_DUPLICATE,
                        f"the same tap as trip {first[0]} ({apart:g} s apart at this gate)",
                    )
            out.append((t, v))
        return out

    def _stored_ids(self, trips: list[Trip]) -> set[tuple[str, str]]:
        """Which of ``trips``' (operator, trip id) are stored already, with any outcome."""
        found: set[tuple[str, str]] = set()
        by_operator: dict[str, list[str]] = defaultdict(list)
        for t in trips:
            by_operator[t.operator_id].append(t.trip_id)
        for operator_id, ids in by_operator.items():
            for i in range(0, len(ids), _CARDS_PER_QUERY):
                some = ids[i : i + _CARDS_PER_QUERY]
                rows = self._db.all(
                    f"SELECT trip_id FROM trips WHERE operator_id = ? AND trip_id IN "
                    f"({', '.join('?' * len(some))})",
                    (operator_id, *some),
                )
                found.update((operator_id, str(r[0])) for r in rows)
        return found

    def _accepted_taps(
        self, gated: list[Trip], window: timedelta
    ) -> defaultdict[common.Tap, list[tuple[datetime, str]]]:
        """Stored accepted trips with a gate near ``gated``'s: ``(occurred_at, trip_id)`` by tap;
        a query per operator and 500 ranges of index ``trips_card_time`` (a card, instants within
        the window of its trips': :func:`common.tap_spans`): only taps that may match are read."""
        taps: defaultdict[common.Tap, list[tuple[datetime, str]]] = defaultdict(list)
        by_operator: dict[str, list[Trip]] = defaultdict(list)
        for t in gated:
            by_operator[t.operator_id].append(t)
        instant = self._db.instant
        for operator_id in sorted(by_operator):
            if self._db.dialect == "postgres":
                # Writers on other replicas: the second of two taps waits for the first's commit.
                key = zlib.crc32(f"{self._db.schema()}/taps/{operator_id}".encode()) - 2**31
                self._db.execute("SELECT pg_advisory_xact_lock(?)", (key,))
            spans = common.tap_spans(by_operator[operator_id], window)
            for i in range(0, len(spans), _CARDS_PER_QUERY):
                some = spans[i : i + _CARDS_PER_QUERY]
                near = [x for c, lo, hi in some for x in (c, instant(lo), instant(hi))]
                rows = self._db.all(
                    "WITH near (card_number, lo, hi) AS (VALUES "
                    f"{', '.join(['(?, ?, ?)'] * len(some))}) "
                    "SELECT t.trip_id, t.issuer_region, t.card_number, g.gate_id, "
                    "t.place_id, t.occurred_at FROM near JOIN trips t ON t.operator_id = ? "
                    "AND t.card_number = near.card_number AND t.occurred_at >= near.lo "
                    "AND t.occurred_at <= near.hi AND t.outcome = 'accepted' "
                    "JOIN trip_gates g ON g.operator_id = t.operator_id "
                    "AND g.trip_id = t.trip_id AND g.gate_id <> ''",
                    (*near, operator_id),
                )
                for trip_id, region, number, gate, place, at in rows:
                    if isinstance(at, str):
                        at = datetime.fromisoformat(at)
                    taps[(operator_id, region, number, gate, place)].append((at, trip_id))
        return taps

    def _resubmission(
        self, insert: str, rows: list[tuple[object, ...]], judged: list[tuple[Trip, Judgement]]
    ) -> list[Judgement]:
        """A batch in which some ids are known: their stored outcomes read in one query per
        operator and 500 ids, the new ones inserted in one ``executemany``. A writer that
        stored one of them meanwhile (another replica) sends it row by row instead."""
        stored = self._stored(judged)
        out: list[Judgement] = []
        fresh: list[tuple[object, ...]] = []
        for row, (t, v) in zip(rows, judged, strict=True):
            key = (t.operator_id, t.trip_id)
            held = stored.get(key)
            if held is not None:  # stored before, or earlier in this very batch
                out.append(resubmitted(held, t))
                continue
            stored[key] = (str(row[2]), v.outcome.value, v.reason.value, v.detail)
            fresh.append(row)
            out.append(v)
        if self._db.dialect == "sqlite":  # the new ones keep consecutive numbers
            top = cast(int, fresh[0][-1]) - 1 if fresh else 0
            fresh = [(*r[:-1], top + i + 1) for i, r in enumerate(fresh)]
        self._db.execute("SAVEPOINT known")
        if self._db.executemany(insert, fresh) == len(fresh):
            self._db.execute("RELEASE known")
            self._added = len(fresh)
            return out
        self._db.execute("ROLLBACK TO known")
        self._db.execute("RELEASE known")
        return [self._one(insert, r, t, v) for r, (t, v) in zip(rows, judged, strict=True)]

    def _stored(self, judged: list[tuple[Trip, Judgement]]) -> dict[tuple[str, str], Stored]:
        """``(digest, outcome, reason, detail)`` of the trips among ``judged`` stored already."""
        by_operator: dict[str, list[str]] = defaultdict(list)
        for t, _ in judged:
            by_operator[t.operator_id].append(t.trip_id)
        found: dict[tuple[str, str], Stored] = {}
        for operator_id, ids in by_operator.items():
            for i in range(0, len(ids), _CARDS_PER_QUERY):
                some = ids[i : i + _CARDS_PER_QUERY]
                for trip_id, digest, outcome, reason, detail in self._db.all(
                    "SELECT trip_id, digest, outcome, reason, detail FROM trips "
                    f"WHERE operator_id = ? AND trip_id IN ({', '.join('?' * len(some))})",
                    (operator_id, *some),
                ):
                    found[(operator_id, str(trip_id))] = (
                        str(digest),
                        str(outcome),
                        str(reason),
                        str(detail),
                    )
        return found

    def _one(
        self, insert: str, row: tuple[object, ...], trip: Trip, verdict: Judgement
    ) -> Judgement:
        if self._db.execute(insert, row) == 1:
            self._added += 1
            return verdict
        stored = self._db.one(
            "SELECT digest, outcome, reason, detail FROM trips "
            "WHERE operator_id = ? AND trip_id = ?",
            (trip.operator_id, trip.trip_id),
        )
        assert stored is not None  # the insert found it
        return resubmitted((stored[0], stored[1], stored[2], stored[3]), trip)

    def _row(self, trip: Trip, verdict: Judgement, when: object) -> tuple[object, ...]:
        at = trip.occurred_at
        if self._db.dialect == "sqlite":
            # utc_text (Db.instant) without its astimezone when the instant is in UTC already
            instant: object = (
                at.isoformat(timespec="microseconds") if at.tzinfo is UTC else utc_text(at)
            )
            day: object = shanghai_day(at).isoformat()
        else:
            instant, day = at.astimezone(UTC), shanghai_day(at)
        entitlement = trip.applied_entitlement
        return (
            trip.operator_id,
            trip.trip_id,
            trip.digest(),
            trip.card.issuer_region,
            trip.card.card_number,
            int(trip.scene),
            trip.place_id,
            instant,
            day,
            trip.gross_fare_fen,
            trip.charged_fen,
            trip.concession_fen,
            int(entitlement) if entitlement else 0,
            trip.fare_version,
            *(_ACCEPTED if verdict is ACCEPT else _columns(verdict)),
            when,
        )

    def accepted_trips(self, day: date, operator_id: str | None = None) -> list[Trip]:
        """The accepted trips of a settlement day (Asia/Shanghai), optionally of one operator."""
        sql = f"SELECT {TRIP_COLUMNS} FROM trips WHERE settlement_day = ? AND outcome = 'accepted'"
        args: list[object] = [self._db.day(day)]
        if operator_id is not None:
            sql += " AND operator_id = ?"
            args.append(operator_id)
        rows = self._db.all(sql + " ORDER BY occurred_at, operator_id, trip_id", args)
        return [trip_from_row(r) for r in rows]

    def outcome(self, operator_id: str, trip_id: str) -> Judgement | None:
        row = self._db.one(
            "SELECT outcome, reason, detail FROM trips WHERE operator_id = ? AND trip_id = ?",
            (operator_id, trip_id),
        )
        return Judgement(Outcome(row[0]), Reason(row[1]), row[2]) if row else None

    def count(self) -> int:
        row = self._db.one("SELECT count(*) FROM trips")
        return int(row[0]) if row else 0

    def ping(self) -> bool:
        """Whether the database answers (a health check: cheap on any size of ledger)."""
        return self._db.one("SELECT 1") == (1,)


def seal_day(db: Db, period: date, now: datetime) -> int:
    """Close ``period`` to new trips for good; the ledger watermark that covers all of them.

    Call it inside ``db.write()`` on the ledger's database: on SQLite that holds
    the write lock, on PostgreSQL the table lock taken here waits for trip writes
    in flight and keeps new ones out until commit, so every trip of the day is
    at or below the watermark read here, and any later one is refused
    ``too_late`` (:meth:`SqlLedger.record`).
    """
    db.lock_trips()
    db.execute(
        "INSERT INTO sealed_days (settlement_day, watermark, sealed_at) VALUES (?, 0, ?) "
        "ON CONFLICT (settlement_day) DO NOTHING",
        (period.isoformat(), utc_text(now)),
    )
    row = db.one("SELECT coalesce(max(ingest_seq), 0) FROM trips")
    top = int(row[0]) if row else 0
    db.execute(
        "UPDATE sealed_days SET watermark = ? WHERE settlement_day = ? AND watermark < ?",
        (top, period.isoformat(), top),
    )
    return top


def is_sealed(db: Db, period: date) -> bool:
    """Whether a close after the late window of ``period`` has run (:func:`seal_day`)."""
    return (
        db.one("SELECT 1 FROM sealed_days WHERE settlement_day = ?", (period.isoformat(),))
        is not None
    )


_ACCEPTED = ("accepted", "ok", "")


def _columns(verdict: Judgement) -> tuple[str, str, str]:
    return (verdict.outcome.value, verdict.reason.value, verdict.detail)


class SqliteLedger(SqlLedger):
    """The ledger in an embedded SQLite file (the default)."""

    def __init__(self, path: Path, duplicate_window: timedelta = DEFAULT_DUPLICATE_WINDOW) -> None:
        super().__init__(Db.sqlite(path), duplicate_window)


class PostgresLedger(SqlLedger):
    """The ledger in a PostgreSQL schema, for districts that run a database server."""

    def __init__(
        self,
        url: str,
        schema: str = "yikatong",
        duplicate_window: timedelta = DEFAULT_DUPLICATE_WINDOW,
    ) -> None:
        super().__init__(Db.postgres(url, schema), duplicate_window)
