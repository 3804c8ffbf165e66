"""The ledger in embedded SQLite (the default).

Trips are keyed by (operator_id, trip_id). Recording a batch is one
transaction committed with ``synchronous=FULL`` before the caller may
acknowledge anything, so an acknowledged trip survives a crash and a
resubmitted one is found again: the same content gets the stored outcome
back, other content under the same id is a conflict and changes nothing.
Times are stored in UTC; the settlement day (Asia/Shanghai) is computed in
Python and stored beside them.
"""

from __future__ import annotations

import threading
from datetime import date, datetime
from pathlib import Path

from broker.cards.model import shanghai_day
from broker.core.db import open_db, utc_text
from broker.settlement.ledger.common import TRIP_COLUMNS, resubmitted, trip_from_row
from broker.settlement.trips import Judgement, Outcome, Reason, Trip

SCHEMA = """
CREATE TABLE IF NOT EXISTS trips (
    operator_id TEXT NOT NULL,
    trip_id TEXT NOT NULL,
    digest TEXT NOT NULL,
    issuer_region TEXT NOT NULL,
    card_number TEXT NOT NULL,
    scene INTEGER NOT NULL,
    place_id TEXT NOT NULL,
    occurred_at TEXT NOT NULL,
    settlement_day TEXT NOT NULL,
    gross_fare_fen INTEGER NOT NULL,
    charged_fen INTEGER NOT NULL,
    concession_fen INTEGER NOT NULL,
    applied_entitlement INTEGER NOT NULL,
    fare_version TEXT NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    received_at TEXT NOT NULL,
    ingest_seq INTEGER NOT NULL,
    PRIMARY KEY (operator_id, trip_id)
);
CREATE INDEX IF NOT EXISTS trips_day ON trips (settlement_day, issuer_region, outcome);
CREATE UNIQUE INDEX IF NOT EXISTS trips_ingest ON trips (ingest_seq);
"""


class SqliteLedger:
    """Thread-safe; meant to be driven from one writer thread (see broker.settlement.intake)."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = open_db(path, SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def record(
        self, judged: list[tuple[Trip, Judgement]], received_at: datetime
    ) -> list[Judgement]:
        """Store each judged trip unless its id is known; return each trip's final outcome.

        The common case, no id known yet, is one ``executemany``; when some id
        is known the batch is redone row by row to answer each resubmission.
        """
        when = utc_text(received_at)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                # Writers are serialised by BEGIN IMMEDIATE: ingest_seq grows in commit order,
                # which is what lets a period close take "everything up to here"
                # (broker.settlement.clearing).
                (seq,) = self._db.execute(
                    "SELECT coalesce(max(ingest_seq), 0) FROM trips"
                ).fetchone()
                rows = [_row(t, v, when, seq + i + 1) for i, (t, v) in enumerate(judged)]
                self._db.execute("SAVEPOINT fresh")
                if self._db.executemany(_INSERT, rows).rowcount == len(rows):
                    self._db.execute("RELEASE fresh")
                    out = [v for _, v in judged]
                else:
                    self._db.execute("ROLLBACK TO fresh")
                    self._db.execute("RELEASE fresh")
                    out = [self._one(row, t, v) for row, (t, v) in zip(rows, judged, strict=True)]
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return out

    def _one(self, row: tuple[object, ...], trip: Trip, verdict: Judgement) -> Judgement:
        if self._db.execute(_INSERT, row).rowcount == 1:
            return verdict
        stored = self._db.execute(
            "SELECT digest, outcome, reason, detail FROM trips "
            "WHERE operator_id = ? AND trip_id = ?",
            (trip.operator_id, trip.trip_id),
        ).fetchone()
        return resubmitted(stored, trip)

    def accepted_trips(self, day: date, operator_id: str | None = None) -> list[Trip]:
        """The accepted trips of a settlement day (Asia/Shanghai), optionally of one operator."""
        sql = f"SELECT {TRIP_COLUMNS} FROM trips WHERE settlement_day = ? AND outcome = 'accepted'"
        args: list[str] = [day.isoformat()]
        if operator_id is not None:
            sql += " AND operator_id = ?"
            args.append(operator_id)
        with self._lock:
            rows = self._db.execute(
                sql + " ORDER BY occurred_at, operator_id, trip_id", args
            ).fetchall()
        return [trip_from_row(r) for r in rows]

    def outcome(self, operator_id: str, trip_id: str) -> Judgement | None:
        with self._lock:
            row = self._db.execute(
                "SELECT outcome, reason, detail FROM trips WHERE operator_id = ? AND trip_id = ?",
                (operator_id, trip_id),
            ).fetchone()
        return Judgement(Outcome(row[0]), Reason(row[1]), row[2]) if row else None

    def count(self) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT count(*) FROM trips").fetchone()
        return int(n)


_INSERT = (
    "INSERT INTO trips VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (operator_id, trip_id) DO NOTHING"
)


def _row(trip: Trip, verdict: Judgement, when: str, seq: int) -> tuple[object, ...]:
    return (
        trip.operator_id,
        trip.trip_id,
        trip.digest(),
        trip.card.issuer_region,
        trip.card.card_number,
        trip.scene.value,
        trip.place_id,
        utc_text(trip.occurred_at),
        shanghai_day(trip.occurred_at).isoformat(),
        trip.gross_fare_fen,
        trip.charged_fen,
        trip.concession_fen,
        trip.applied_entitlement.value if trip.applied_entitlement else 0,
        trip.fare_version,
        verdict.outcome.value,
        verdict.reason.value,
        verdict.detail,
        when,
        seq,
    )
