"""The ledger in PostgreSQL (psycopg 3), for districts that run a database server.

Same behaviour as :mod:`broker.settlement.ledger.sqlite`, with PostgreSQL types: instants
are ``timestamptz`` (stored in UTC), the settlement day a ``date`` computed in
Python (Asia/Shanghai). One connection, used from the intake's single writer
thread; each batch is one transaction, committed before it is acknowledged.
"""

from __future__ import annotations

import re
import threading
from datetime import UTC, date, datetime

import psycopg

from broker.cards.model import shanghai_day
from broker.core.errors import ConfigError
from broker.settlement.ledger.common import TRIP_COLUMNS, resubmitted, trip_from_row
from broker.settlement.trips import Judgement, Outcome, Reason, Trip

_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")

TABLE = """
CREATE TABLE IF NOT EXISTS {schema}.trips (
    operator_id text NOT NULL,
    trip_id text NOT NULL,
    digest text NOT NULL,
    issuer_region text NOT NULL,
    card_number text NOT NULL,
    scene integer NOT NULL,
    place_id text NOT NULL,
    occurred_at timestamptz NOT NULL,
    settlement_day date NOT NULL,
    gross_fare_fen bigint NOT NULL,
    charged_fen bigint NOT NULL,
    concession_fen bigint NOT NULL,
    applied_entitlement integer NOT NULL,
    fare_version text NOT NULL,
    outcome text NOT NULL,
    reason text NOT NULL,
    detail text NOT NULL,
    received_at timestamptz NOT NULL,
    ingest_seq bigserial NOT NULL UNIQUE,
    PRIMARY KEY (operator_id, trip_id)
);
CREATE INDEX IF NOT EXISTS trips_day ON {schema}.trips (settlement_day, issuer_region, outcome);
"""


# Every column but ingest_seq, which the sequence fills (broker.settlement.clearing says why).
INSERT_COLUMNS = (
    "operator_id, trip_id, digest, issuer_region, card_number, scene, place_id, occurred_at, "
    "settlement_day, gross_fare_fen, charged_fen, concession_fen, applied_entitlement, "
    "fare_version, outcome, reason, detail, received_at"
)


class PostgresLedger:
    """Thread-safe; meant to be driven from one writer thread (see broker.settlement.intake)."""

    def __init__(self, url: str, schema: str = "yikatong") -> None:
        if not _SCHEMA_RE.fullmatch(schema):
            raise ConfigError("ledger schema must be a lower-case SQL identifier")
        self._schema = schema
        self._lock = threading.Lock()
        try:
            self._db = psycopg.connect(url, autocommit=False)
        except psycopg.OperationalError as exc:
            raise ConfigError(f"cannot reach the ledger database: {exc}") from exc
        with self._lock, self._db.transaction():
            self._db.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            for stmt in TABLE.format(schema=schema).split(";"):
                if stmt.strip():
                    self._db.execute(stmt)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def record(
        self, judged: list[tuple[Trip, Judgement]], received_at: datetime
    ) -> list[Judgement]:
        """Store each judged trip unless its id is known; return each trip's final outcome.

        The common case, no id known yet, is one pipelined ``executemany``; when
        some id is known the batch is redone row by row to answer each resubmission.
        """
        insert = (
            f"INSERT INTO {self._schema}.trips ({INSERT_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, "
            "%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (operator_id, trip_id) DO NOTHING"
        )
        when = received_at.astimezone(UTC)
        rows = [_row(t, v, when) for t, v in judged]
        with self._lock, self._db.transaction():
            with self._db.cursor() as cur:
                cur.execute("SAVEPOINT fresh")
                cur.executemany(insert, rows)
                if cur.rowcount == len(rows):
                    cur.execute("RELEASE fresh")
                    return [v for _, v in judged]
                cur.execute("ROLLBACK TO fresh")
                cur.execute("RELEASE fresh")
            return [self._one(insert, row, t, v) for row, (t, v) in zip(rows, judged, strict=True)]

    def _one(
        self, insert: str, row: tuple[object, ...], trip: Trip, verdict: Judgement
    ) -> Judgement:
        if self._db.execute(insert, row).rowcount == 1:
            return verdict
        found = self._db.execute(
            f"SELECT digest, outcome, reason, detail FROM {self._schema}.trips "
            "WHERE operator_id = %s AND trip_id = %s",
            (trip.operator_id, trip.trip_id),
        ).fetchone()
        assert found is not None  # the insert found it
        return resubmitted(tuple(found), trip)

    def accepted_trips(self, day: date, operator_id: str | None = None) -> list[Trip]:
        """The accepted trips of a settlement day (Asia/Shanghai), optionally of one operator."""
        sql = (
            f"SELECT {TRIP_COLUMNS} FROM {self._schema}.trips "
            "WHERE settlement_day = %s AND outcome = 'accepted'"
        )
        args: list[object] = [day]
        if operator_id is not None:
            sql += " AND operator_id = %s"
            args.append(operator_id)
        with self._lock, self._db.transaction():
            rows = self._db.execute(
                sql + " ORDER BY occurred_at, operator_id, trip_id", args
            ).fetchall()
        return [trip_from_row(tuple(r)) for r in rows]

    def outcome(self, operator_id: str, trip_id: str) -> Judgement | None:
        with self._lock, self._db.transaction():
            row = self._db.execute(
                f"SELECT outcome, reason, detail FROM {self._schema}.trips "
                "WHERE operator_id = %s AND trip_id = %s",
                (operator_id, trip_id),
            ).fetchone()
        return Judgement(Outcome(row[0]), Reason(row[1]), row[2]) if row else None

    def count(self) -> int:
        with self._lock, self._db.transaction():
            row = self._db.execute(f"SELECT count(*) FROM {self._schema}.trips").fetchone()
        return int(row[0]) if row else 0


def _row(trip: Trip, verdict: Judgement, when: datetime) -> tuple[object, ...]:
    return (
        trip.operator_id,
        trip.trip_id,
        trip.digest(),
        trip.card.issuer_region,
        trip.card.card_number,
        trip.scene.value,
        trip.place_id,
        trip.occurred_at.astimezone(UTC),
        shanghai_day(trip.occurred_at),
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
