"""Trip intake (broker.settlement.intake): judge, record on one writer thread, answer after commit.

Every test runs on a real ledger, SQLite and PostgreSQL (``ledger_factory``).
"""

from __future__ import annotations

import asyncio
import threading
from datetime import date, datetime, timedelta
from typing import Any

import pytest

from broker.cards.model import CardRef
from broker.core.errors import Busy
from broker.settlement.intake import MAX_TRIPS_PER_REQUEST, TripIntake
from broker.settlement.ledger import Ledger, SqliteLedger
from broker.settlement.trips import ACCEPT, Judgement, Outcome, Reason, Trip
from tests.settlement.ledger.test_common import NOW, trip  # one trip factory for both

KNOWN = frozenset({"500111", "512021"})
MALFORMED = Judgement(Outcome.REJECTED, Reason.MALFORMED, "trips[1].scene: must be one of ...")


class Clock:
    def __init__(self, at: datetime = NOW) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


class Watched:
    """A ledger that records which thread calls it and can hold ``record`` until released."""

    def __init__(self, inner: Ledger, hold: bool = False) -> None:
        self.inner = inner
        self.threads: list[str] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.closed = False
        if not hold:
            self.release.set()

    def record(
        self, judged: list[tuple[Trip, Judgement]], received_at: datetime
    ) -> list[Judgement]:
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        assert self.release.wait(10)
        return self.inner.record(judged, received_at)

    def outcome(self, operator_id: str, trip_id: str) -> Judgement | None:
        self.threads.append(threading.current_thread().name)
        return self.inner.outcome(operator_id, trip_id)

    def accepted_trips(self, day: date, operator_id: str | None = None) -> list[Trip]:
        return self.inner.accepted_trips(day, operator_id)

    def count(self) -> int:
        return self.inner.count()

    def ping(self) -> bool:
        return self.inner.ping()

    def close(self) -> None:
        self.closed = True
        self.inner.close()


def intake_on(ledger: Ledger, clock: Clock | None = None) -> TripIntake:
    return TripIntake(ledger, KNOWN, None, clock or Clock())


async def test_judged_trips_are_answered_only_once_committed(ledger_factory):
    """While the ledger write is held, no answer; once it returns, another connection sees it."""
    watched = Watched(ledger_factory(), hold=True)
    intake = intake_on(watched)
    other = ledger_factory()  # a second connection: sees only what is committed
    task = asyncio.create_task(intake.submit([trip(1), trip(2, charged_fen=10)]))
    assert await asyncio.to_thread(watched.entered.wait, 10)
    await asyncio.sleep(0.05)
    assert not task.done()
    assert other.count() == 0
    watched.release.set()
    got = await task
    assert [j.outcome for j in got] == [Outcome.ACCEPTED, Outcome.REJECTED]
    assert other.count() == 2
    assert other.outcome("bus-01", "t-000001") == got[0]
    assert other.outcome("bus-01", "t-000002") == got[1]
    other.close()
    intake.close()


async def test_writes_and_reads_happen_on_the_one_writer_thread(ledger_factory):
    watched = Watched(ledger_factory())
    intake = intake_on(watched)
    await intake.submit([trip(1)])
    await intake.outcomes("bus-01", ["t-000001", "t-000002"])
    await intake.submit([trip(3)])
    assert len(watched.threads) >= 3  # two submits and a read at least: every one recorded
    assert len(set(watched.threads)) == 1
    assert watched.threads[0].startswith("ledger-writer")
    assert watched.threads[0] != threading.current_thread().name
    intake.close()


async def test_a_batch_with_bad_trips_keeps_its_good_ones_in_order(ledger_factory):
    ledger = ledger_factory()
    intake = intake_on(ledger)
    items: list[Trip | Judgement] = [
        trip(1),
        MALFORMED,  # a line trip_from_wire refused: passes through, stored nowhere
        trip(2, card=CardRef("500118", "C5001180000001")),  # no agreement with 500118
        trip(3, occurred_at=NOW + timedelta(hours=1)),
        trip(4),
    ]
    got = await intake.submit(items)
    assert got[0] == ACCEPT and got[4] == ACCEPT
    assert got[1] is MALFORMED
    assert (got[2].reason, got[3].reason) == (Reason.UNKNOWN_DISTRICT, Reason.IN_FUTURE)
    assert ledger.count() == 4  # rejected trips are stored too, with their reason
    stored = await intake.outcomes("bus-01", ["t-000001", "t-000002", "t-000003", "t-000004"])
    assert stored == [got[0], got[2], got[3], got[4]]
    intake.close()


async def test_trips_are_judged_at_the_clocks_time(ledger_factory):
    clock = Clock(NOW + timedelta(hours=72, minutes=6))
    intake = intake_on(ledger_factory(), clock)
    [late] = await intake.submit([trip(1)])  # occurred 72 h 11 min before the clock
    assert late.reason is Reason.TOO_LATE
    intake.close()


async def test_a_resubmission_answers_the_stored_outcome(ledger_factory):
    clock = Clock()
    intake = intake_on(ledger_factory(), clock)
    first = await intake.submit([trip(1), trip(2, charged_fen=10)])
    clock.at = NOW + timedelta(days=5)  # judged again now, both would be too late
    again = await intake.submit([trip(1), trip(2, charged_fen=10)])
    assert again == first
    assert again[0] == ACCEPT and again[1].reason is Reason.BAD_AMOUNTS
    intake.close()


async def test_a_resubmission_with_other_content_is_a_conflict_and_changes_nothing(ledger_factory):
    intake = intake_on(ledger_factory())
    [first] = await intake.submit([trip(1)])
    [conflict] = await intake.submit([trip(1, place_id="route-9")])
    assert conflict.outcome is Outcome.CONFLICT
    assert conflict.reason is Reason.DUPLICATE_CONTENT_DIFFERS
    assert await intake.outcomes("bus-01", ["t-000001"]) == [first]
    intake.close()


async def test_a_batch_of_only_refused_lines_or_nothing_stores_nothing(ledger_factory):
    ledger = ledger_factory()
    intake = intake_on(ledger)
    assert await intake.submit([]) == []
    assert await intake.submit([MALFORMED, MALFORMED]) == [MALFORMED, MALFORMED]
    assert ledger.count() == 0
    intake.close()


async def test_outcomes_answer_in_order_with_none_for_unknown_ids(ledger_factory):
    intake = intake_on(ledger_factory())
    await intake.submit([trip(1), trip(2, operator_id="museum-01")])
    got = await intake.outcomes("bus-01", ["t-000404", "t-000001", "t-000002"])
    assert got == [None, ACCEPT, None]  # t-000002 is another operator's
    assert await intake.outcomes("bus-01", []) == []
    intake.close()


async def test_a_full_request_of_max_trips_is_recorded_in_one_submit(tmp_path):
    """On SQLite only, to stay fast (a full request costs ~0.5 s per store)."""
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    intake = intake_on(ledger)
    items: list[Trip | Judgement] = [trip(n) for n in range(MAX_TRIPS_PER_REQUEST)]
    items[-1] = trip(MAX_TRIPS_PER_REQUEST - 1, charged_fen=10)  # the last one is bad
    got = await intake.submit(items)
    assert len(got) == MAX_TRIPS_PER_REQUEST
    assert all(j == ACCEPT for j in got[:-1]) and got[-1].reason is Reason.BAD_AMOUNTS
    assert ledger.count() == MAX_TRIPS_PER_REQUEST
    intake.close()


async def test_close_waits_for_the_writer_then_closes_the_ledger(ledger_factory):
    watched = Watched(ledger_factory())
    intake = intake_on(watched)
    await intake.submit([trip(1)])
    intake.close()
    assert watched.closed
    with pytest.raises(RuntimeError):
        await intake.submit([trip(2)])  # no writer any more: nothing is written
    reopened = ledger_factory()
    assert reopened.count() == 1
    reopened.close()


async def test_trips_are_judged_off_the_event_loop(ledger_factory, monkeypatch):
    """Judging 10,000 trips takes tens of ms: it runs on the writer, not on the loop."""
    import broker.settlement.intake as intake_module
    from broker.settlement.trips import judge as real

    judged_on: list[str] = []

    def watching(*args: Any, **kwargs: Any) -> Judgement:
        judged_on.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(intake_module, "judge", watching)
    intake = intake_on(ledger_factory())
    assert await intake.submit([trip(1), trip(2)]) == [ACCEPT, ACCEPT]
    assert len(judged_on) == 2
    assert all(name.startswith("ledger-writer") for name in judged_on)
    intake.close()


async def test_a_full_queue_refuses_more_at_once_and_loses_nothing(ledger_factory):
    """Back-pressure: beyond the queue's bound a request is refused busy, with a retry hint,
    while the ones queued before it are all recorded."""
    watched = Watched(ledger_factory(), hold=True)
    intake = TripIntake(watched, KNOWN, None, Clock(), max_queued=3)
    first = asyncio.create_task(intake.submit([trip(1), trip(2)]))
    assert await asyncio.to_thread(watched.entered.wait, 10)
    with pytest.raises(Busy, match=r"2 trips are waiting to be recorded; retry in 1 s"):
        await intake.submit([trip(3), trip(4)])
    second = asyncio.create_task(intake.submit([trip(5)]))  # fits: 2 + 1 <= 3
    await asyncio.sleep(0)
    watched.release.set()
    assert await first == [ACCEPT, ACCEPT] and await second == [ACCEPT]
    assert watched.inner.count() == 3
    assert await intake.submit([trip(3), trip(4)]) == [ACCEPT, ACCEPT]  # served later
    intake.close()


async def test_a_request_larger_than_the_queue_is_served_when_nothing_waits(ledger_factory):
    """The bound holds back requests behind others, never one alone (it would never pass)."""
    intake = TripIntake(ledger_factory(), KNOWN, None, Clock(), max_queued=1)
    assert await intake.submit([trip(1), trip(2)]) == [ACCEPT, ACCEPT]
    intake.close()


async def test_admit_says_busy_before_any_work_when_the_queue_is_full(ledger_factory):
    """The node asks before decoding a request: refused, it costs nothing."""
    watched = Watched(ledger_factory(), hold=True)
    intake = TripIntake(watched, KNOWN, None, Clock(), max_queued=2)
    intake.admit(5)  # nothing waits: any size passes
    first = asyncio.create_task(intake.submit([trip(1), trip(2)]))
    assert await asyncio.to_thread(watched.entered.wait, 10)
    with pytest.raises(Busy):
        intake.admit(1)
    watched.release.set()
    await first
    intake.admit(2)
    intake.close()
