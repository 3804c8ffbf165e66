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

from datetime import date, datetime
from pathlib import Path

from broker.cards.model import shanghai_day
from broker.core.db import Db, Migration, migrate
from broker.settlement.ledger.common import TRIP_COLUMNS, resubmitted, trip_from_row
from broker.settlement.trips import Judgement, Outcome, Reason, Trip

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


class SqlLedger:
    """Thread-safe; meant to be driven from one writer thread (see broker.settlement.intake)."""

    def __init__(self, db: Db) -> None:
        self._db = db
        migrate(db, "ledger", MIGRATIONS)

    def close(self) -> None:
        self._db.close()

    def record(
        self, judged: list[tuple[Trip, Judgement]], received_at: datetime
    ) -> list[Judgement]:
        """Store each judged trip unless its id is known; return each trip's final outcome.

        The common case, no id known yet, is one ``executemany``; when some id
        is known the batch is redone row by row to answer each resubmission.
        """
        when = self._db.instant(received_at)
        rows = [self._row(t, v, when) for t, v in judged]
        with self._db.write():
            insert = _INSERT
            if self._db.dialect == "sqlite":
                row = self._db.one("SELECT coalesce(max(ingest_seq), 0) FROM trips")
                top = int(row[0]) if row else 0
                rows = [(*r, top + i + 1) for i, r in enumerate(rows)]
                insert = _INSERT_SEQ
            self._db.execute("SAVEPOINT fresh")
            if self._db.executemany(insert, rows) == len(rows):
                self._db.execute("RELEASE fresh")
                return [v for _, v in judged]
            self._db.execute("ROLLBACK TO fresh")
            self._db.execute("RELEASE fresh")
            return [self._one(insert, r, t, v) for r, (t, v) in zip(rows, judged, strict=True)]

    def _one(
        self, insert: str, row: tuple[object, ...], trip: Trip, verdict: Judgement
    ) -> Judgement:
        if self._db.execute(insert, row) == 1:
            return verdict
        stored = self._db.one(
            "SELECT digest, outcome, reason, detail FROM trips "
            "WHERE operator_id = ? AND trip_id = ?",
            (trip.operator_id, trip.trip_id),
        )
        assert stored is not None  # the insert found it
        return resubmitted((stored[0], stored[1], stored[2], stored[3]), trip)

    def _row(self, trip: Trip, verdict: Judgement, when: object) -> tuple[object, ...]:
        return (
            trip.operator_id,
            trip.trip_id,
            trip.digest(),
            trip.card.issuer_region,
            trip.card.card_number,
            trip.scene.value,
            trip.place_id,
            self._db.instant(trip.occurred_at),
            self._db.day(shanghai_day(trip.occurred_at)),
            trip.gross_fare_fen,
            trip.charged_fen,
            trip.concession_fen,
            trip.applied_entitlement.value if trip.applied_entitlement else 0,
            trip.fare_version,
            verdict.outcome.value,
            verdict.reason.value,
            verdict.detail,
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


class SqliteLedger(SqlLedger):
    """The ledger in an embedded SQLite file (the default)."""

    def __init__(self, path: Path) -> None:
        super().__init__(Db.sqlite(path))


class PostgresLedger(SqlLedger):
    """The ledger in a PostgreSQL schema, for districts that run a database server."""

    def __init__(self, url: str, schema: str = "yikatong") -> None:
        super().__init__(Db.postgres(url, schema))
