"""Sealed days (broker/settlement/ledger/store.py ``seal_day``): a day closed after its late
window takes no trip any more, judged in the ledger's write transaction — on SQLite and
PostgreSQL, with a trip write in flight while the day is sealed.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.cards.model import shanghai_day
from broker.core.db import Db
from broker.settlement.ledger.store import (
    PostgresLedger,
    SqliteLedger,
    SqlLedger,
    is_sealed,
    seal_day,
)
from broker.settlement.trips import ACCEPT, Judgement, Outcome, Reason, Trip
from tests.settlement.ledger.test_common import NOW, trip

DAY = shanghai_day(NOW - timedelta(minutes=5))  # the day of every trip()


@dataclass
class Backend:
    name: str
    ledger: Callable[[type[SqlLedger]], SqlLedger]  # a ledger of the given class
    db: Callable[[], Db]  # another connection to the same database


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        path = tmp_path / "ledger.sqlite3"
        yield Backend(
            "sqlite",
            lambda cls: cls(path),  # type: ignore[arg-type]
            lambda: Db.sqlite(path, busy_timeout_ms=30_000),
        )
        return
    url = request.getfixturevalue("postgres_url")
    schema = f"yk_test_{secrets.token_hex(4)}"
    yield Backend(
        "postgres",
        lambda cls: cls(url, schema),  # type: ignore[arg-type]
        lambda: Db.postgres(url, schema),
    )
    raw = Db.postgres(url, schema)
    raw.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    raw.close()


def kind(b: Backend) -> type[SqlLedger]:
    return SqliteLedger if b.name == "sqlite" else PostgresLedger


def sealed(db: Db) -> int:
    with db.write():
        return seal_day(db, DAY, NOW)


def test_a_trip_of_a_sealed_day_is_too_late_and_one_stored_before_keeps_its_outcome(
    backend: Backend,
) -> None:
    ledger = backend.ledger(kind(backend))
    db = backend.db()
    try:
        assert ledger.record([(trip(1), ACCEPT)], NOW) == [ACCEPT]
        assert not is_sealed(db, DAY)
        assert sealed(db) >= 1
        assert is_sealed(db, DAY)
        late, next_day = trip(2), trip(3, occurred_at=NOW + timedelta(days=1))
        [refused, other] = ledger.record([(late, ACCEPT), (next_day, ACCEPT)], NOW)
        assert (refused.outcome, refused.reason) == (Outcome.REJECTED, Reason.TOO_LATE)
        assert f"day {DAY} is closed for good" in refused.detail
        assert other == ACCEPT  # another day is open
        assert ledger.record([(trip(1), ACCEPT)], NOW) == [ACCEPT]  # stored before the seal
        assert ledger.accepted_trips(DAY) == [trip(1)]
    finally:
        db.close()
        ledger.close()


def test_sealing_again_keeps_the_first_seal_and_never_lowers_the_watermark(
    backend: Backend,
) -> None:
    ledger = backend.ledger(kind(backend))
    db = backend.db()
    try:
        ledger.record([(trip(1), ACCEPT), (trip(2), ACCEPT)], NOW)
        first = sealed(db)
        ledger.record([(trip(3, occurred_at=NOW + timedelta(days=1)), ACCEPT)], NOW)
        assert sealed(db) > first  # covers what was written since (of other days)
        rows = db.all("SELECT settlement_day, sealed_at FROM sealed_days")
        assert [r[0] for r in rows] == [DAY.isoformat()]
    finally:
        db.close()
        ledger.close()


def test_a_trip_write_in_flight_is_covered_by_the_seal_that_waits_for_it(
    backend: Backend,
) -> None:
    """The seal waits for a trip write that passed the check: that trip is below the mark."""
    entered, go = threading.Event(), threading.Event()

    class Paused(kind(backend)):  # type: ignore[misc]
        def _unsealed(self, judged: list[tuple[Trip, Judgement]]) -> list[tuple[Trip, Judgement]]:
            out: list[tuple[Trip, Judgement]] = super()._unsealed(judged)  # not sealed: goes in
            entered.set()
            assert go.wait(timeout=20)
            return out

    writer = backend.ledger(Paused)
    sealer = backend.db()
    watch = backend.db()
    results: dict[str, object] = {}
    try:
        recording = threading.Thread(
            target=lambda: results.update(trip=writer.record([(trip(1), ACCEPT)], NOW))
        )
        recording.start()
        assert entered.wait(timeout=20)
        sealing = threading.Thread(target=lambda: results.update(mark=sealed(sealer)))
        sealing.start()
        if backend.name == "postgres":  # the seal is queued behind the writer's table lock
            for _ in range(200):
                row = watch.one(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE 'LOCK TABLE trips IN EXCLUSIVE MODE%'"
                )
                if row and row[0]:
                    break
                threading.Event().wait(0.05)
            else:
                pytest.fail("the seal did not wait for the trip write in flight")
        assert "mark" not in results
        go.set()
        recording.join(timeout=20)
        sealing.join(timeout=20)
        assert results["trip"] == [ACCEPT]
        seq = watch.one("SELECT ingest_seq FROM trips WHERE trip_id = ?", (trip(1).trip_id,))
        assert seq is not None and int(seq[0]) <= int(results["mark"])  # type: ignore[call-overload]
        [late] = writer.record([(trip(2), ACCEPT)], NOW)  # no pause now: the event is set
        assert late.reason is Reason.TOO_LATE
    finally:
        go.set()
        for d in (sealer, watch):
            d.close()
        writer.close()


def test_a_batch_of_known_and_new_trips_answers_each_and_numbers_the_new_in_order(
    backend: Backend,
) -> None:
    """Stored ids get their stored outcome (or CONFLICT), new ones are inserted, the same new
    id twice in one batch is stored once; new trips still take consecutive numbers."""
    ledger = backend.ledger(kind(backend))
    db = backend.db()
    try:
        assert ledger.record([(trip(1), ACCEPT), (trip(2), ACCEPT)], NOW) == [ACCEPT, ACCEPT]
        changed = trip(2, charged_fen=150, concession_fen=50)
        got = ledger.record(
            [
                (trip(3), ACCEPT),
                (trip(1), ACCEPT),
                (changed, ACCEPT),
                (trip(4), ACCEPT),
                (trip(3), ACCEPT),
            ],
            NOW,
        )
        assert [j.outcome for j in got] == [
            Outcome.ACCEPTED,
            Outcome.ACCEPTED,
            Outcome.CONFLICT,
            Outcome.ACCEPTED,
            Outcome.ACCEPTED,
        ]
        seqs = [int(s) for (s,) in db.all("SELECT ingest_seq FROM trips ORDER BY ingest_seq")]
        assert len(seqs) == 4
        if backend.name == "sqlite":
            assert seqs == list(range(seqs[0], seqs[0] + 4))
    finally:
        db.close()
        ledger.close()


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)  # SQLite's lock keeps it out
def test_a_trip_stored_by_another_writer_meanwhile_is_answered_row_by_row(
    backend: Backend,
) -> None:
    """PostgreSQL (replicas): another writer commits one of the batch's new ids between the
    read of the stored ones and the insert; that trip gets its stored outcome, none is lost."""
    other = backend.ledger(kind(backend))
    raced = trip(6, charged_fen=150, concession_fen=50)  # other content under the same id

    class Raced(kind(backend)):  # type: ignore[misc]
        def _stored(self, judged: list[tuple[Trip, Judgement]]) -> dict[Any, Any]:
            found: dict[Any, Any] = super()._stored(judged)
            other.record([(raced, ACCEPT)], NOW)  # commits at once, on its own connection
            return found

    ledger = backend.ledger(Raced)
    try:
        ledger.record([(trip(5), ACCEPT)], NOW)
        got = ledger.record([(trip(5), ACCEPT), (trip(6), ACCEPT), (trip(7), ACCEPT)], NOW)
        assert [j.outcome for j in got] == [Outcome.ACCEPTED, Outcome.CONFLICT, Outcome.ACCEPTED]
        assert ledger.outcome("bus-01", trip(7).trip_id) == ACCEPT
    finally:
        ledger.close()
        other.close()
