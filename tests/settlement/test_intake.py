"""Trip intake in its own process (broker.settlement.intake): raw bytes there and back,
bounded, and what a worker that dies leaves behind.

Real worker processes (spawned, in the background: SCHED_IDLE) on real ledgers. The test hooks of
broker.settlement.clearing.crash (``YIKATONG_PAUSE_AT`` / ``YIKATONG_CRASH_AT``)
reach the worker through its environment, which it takes from this process
when it is spawned (at the first request).
"""

from __future__ import annotations

import asyncio
import os
import signal
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from broker._proto.yikatong.v1 import settlement_pb2
from broker.core.errors import Busy, InvalidArgument, Unavailable
from broker.core.priority import in_background
from broker.settlement.intake import MAX_QUEUED_BYTES, NICE, IntakeSpec, TripIntake
from broker.settlement.ledger import SqliteLedger
from broker.settlement.trips import Trip
from broker.settlement.wire import trip_to_wire
from tests.settlement.ledger.test_common import NOW, trip

KNOWN = frozenset({"500111", "512021"})
OUT = settlement_pb2


class Clock:
    def __init__(self, at: datetime = NOW) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


def body(*trips: Trip) -> bytes:
    return OUT.SubmitTripsRequest(trips=[trip_to_wire(t) for t in trips]).SerializeToString()


def reasons(data: bytes) -> list[str]:
    return [r.reason for r in OUT.SubmitTripsResponse.FromString(data).results]


def spec_at(path: Path) -> IntakeSpec:
    return IntakeSpec(path / "ledger.sqlite3", None, "yikatong", KNOWN, None)


def stored(path: Path) -> int:
    ledger = SqliteLedger(path / "ledger.sqlite3")
    try:
        return ledger.count()
    finally:
        ledger.close()


async def reached(release: Path) -> None:
    """Wait until the worker holds at the pause point (it creates ``<release>.reached``)."""
    mark = release.with_name(release.name + ".reached")
    for _ in range(1000):
        if mark.exists():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the worker never reached the pause point")


@pytest.fixture
def pause_at(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Hold the next worker spawned at a point; the release file lets it go on."""
    release = tmp_path / "release"

    def hold(point: str) -> Path:
        monkeypatch.setenv("YIKATONG_PAUSE_AT", point)
        monkeypatch.setenv("YIKATONG_PAUSE_FILE", str(release))
        return release

    return hold


async def test_trips_are_recorded_by_a_background_process_of_their_own(tmp_path: Path):
    """The worker runs behind the node's threads: SCHED_IDLE on Linux (niced elsewhere)."""
    intake = TripIntake(spec_at(tmp_path), Clock())
    try:
        assert intake.worker_pid is None  # spawned at the first request, not before
        assert await intake.reachable()  # the health check starts no worker
        assert intake.worker_pid is None
        got = await intake.submit(body(trip(1), trip(2, charged_fen=10)), "bus-01")
        assert reasons(got) == ["ok", "bad_amounts"]
        pid = intake.worker_pid
        assert pid is not None and pid != os.getpid()
        if hasattr(os, "SCHED_IDLE"):
            assert os.sched_getscheduler(pid) == os.SCHED_IDLE
        else:
            assert os.getpriority(os.PRIO_PROCESS, pid) == os.getpriority(os.PRIO_PROCESS, 0) + NICE
        assert in_background(pid)
        assert stored(tmp_path) == 2  # committed before the answer came back
        asked = await intake.outcomes("bus-01", ["t-000002", "t-000404"])
        assert reasons(asked) == ["bad_amounts", "unknown"]
    finally:
        intake.close()
    assert not _alive(pid)  # close stops the worker (and reaps it)
    with pytest.raises(Unavailable, match="closed"):
        await intake.submit(body(trip(3)), "bus-01")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_trips_are_judged_at_the_nodes_clock_not_the_workers(tmp_path: Path):
    clock = Clock(NOW + timedelta(hours=72, minutes=6))  # the trip occurred 72 h 11 min before
    intake = TripIntake(spec_at(tmp_path), clock)
    try:
        assert reasons(await intake.submit(body(trip(1)), "bus-01")) == ["too_late"]
        clock.at = NOW
        assert reasons(await intake.submit(body(trip(2)), "bus-01")) == ["ok"]
    finally:
        intake.close()


async def test_garbage_bytes_are_refused_naming_the_request_and_the_worker_serves_on(
    tmp_path: Path,
):
    intake = TripIntake(spec_at(tmp_path), Clock())
    try:
        with pytest.raises(InvalidArgument) as info:
            await intake.submit(b"\xff\x00garbage", "bus-01")
        assert str(info.value) == "request: does not decode as yikatong.v1.SubmitTripsRequest"
        assert reasons(await intake.submit(body(trip(1)), "bus-01")) == ["ok"]
    finally:
        intake.close()


async def test_a_worker_killed_after_its_commit_loses_nothing_and_doubles_nothing(
    tmp_path: Path, pause_at
):
    """kill -9 of the worker between its commit and its answer: the call fails UNAVAILABLE;
    the next request starts a new worker, and the resubmission gets the stored outcomes."""
    release = pause_at("intake_recorded")
    intake = TripIntake(spec_at(tmp_path), Clock())
    try:
        request = body(trip(1), trip(2), trip(3, charged_fen=10))
        call = asyncio.create_task(intake.submit(request, "bus-01"))
        await reached(release)
        first = intake.worker_pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        with pytest.raises(Unavailable, match="submit the trips again"):
            await call
        assert stored(tmp_path) == 3  # committed before it died: kept
        release.touch()  # the new worker passes the point
        again = await intake.submit(request, "bus-01")
        assert reasons(again) == ["ok", "ok", "bad_amounts"]  # the stored outcomes
        assert intake.worker_pid not in (None, first)
        assert stored(tmp_path) == 3  # nothing doubled
    finally:
        release.touch()
        intake.close()


async def test_a_worker_dead_before_its_commit_kept_nothing_of_the_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("YIKATONG_CRASH_AT", "intake_started")
    intake = TripIntake(spec_at(tmp_path), Clock())
    try:
        with pytest.raises(Unavailable):
            await intake.submit(body(trip(1)), "bus-01")
        assert stored(tmp_path) == 0
        monkeypatch.delenv("YIKATONG_CRASH_AT")  # the next worker is spawned without it
        assert reasons(await intake.submit(body(trip(1)), "bus-01")) == ["ok"]
        assert stored(tmp_path) == 1
    finally:
        intake.close()


async def test_beyond_the_bound_a_request_is_refused_busy_and_the_queued_ones_are_kept(
    tmp_path: Path, pause_at
):
    """Back-pressure: while the worker holds a request, one that would pass the bytes bound
    is refused at once (RESOURCE_EXHAUSTED with a retry hint); one that fits waits its turn."""
    release = pause_at("intake_started")
    small, large = body(trip(1)), body(trip(2), trip(3), trip(4))
    intake = TripIntake(spec_at(tmp_path), Clock(), max_queued_bytes=2 * len(small) + 1)
    try:
        first = asyncio.create_task(intake.submit(small, "bus-01"))
        await reached(release)
        with pytest.raises(Busy, match=r"1 requests \(\d+ bytes\) are waiting.*retry in 1 s"):
            await intake.submit(large, "bus-01")
        second = asyncio.create_task(intake.submit(body(trip(5)), "bus-01"))  # fits
        await asyncio.sleep(0.05)
        release.touch()
        assert reasons(await first) == ["ok"] and reasons(await second) == ["ok"]
        assert reasons(await intake.submit(large, "bus-01")) == ["ok"] * 3  # served later
        assert stored(tmp_path) == 5
    finally:
        release.touch()
        intake.close()


async def test_the_number_of_requests_waiting_is_bounded_too(tmp_path: Path, pause_at):
    release = pause_at("intake_started")
    intake = TripIntake(spec_at(tmp_path), Clock(), max_queued_requests=2)
    try:
        calls = [asyncio.create_task(intake.submit(body(trip(1)), "bus-01"))]
        await reached(release)
        calls.append(asyncio.create_task(intake.submit(body(trip(2)), "bus-01")))
        await asyncio.sleep(0)
        with pytest.raises(Busy):
            await intake.submit(body(trip(3)), "bus-01")
        release.touch()
        assert [reasons(await c) for c in calls] == [["ok"], ["ok"]]
    finally:
        release.touch()
        intake.close()


async def test_a_request_larger_than_the_bound_is_served_when_nothing_waits(tmp_path: Path):
    intake = TripIntake(spec_at(tmp_path), Clock(), max_queued_bytes=1)
    try:
        assert reasons(await intake.submit(body(trip(1), trip(2)), "bus-01")) == ["ok", "ok"]
    finally:
        intake.close()


async def test_a_cancelled_call_still_counts_until_the_worker_is_done_with_it(
    tmp_path: Path, pause_at
):
    """A caller that gives up does not stop the work it handed over: the bound still counts
    it, and its trips are recorded (an operator finds them with GetTripOutcomes)."""
    release = pause_at("intake_started")
    small = body(trip(1))
    intake = TripIntake(spec_at(tmp_path), Clock(), max_queued_bytes=len(small) + 1)
    try:
        call = asyncio.create_task(intake.submit(small, "bus-01"))
        await reached(release)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        with pytest.raises(Busy):
            await intake.submit(small, "bus-01")
        release.touch()
        for _ in range(500):
            if stored(tmp_path) == 1:
                break
            await asyncio.sleep(0.02)
        # Committed; the bound lets go once the worker's answer reaches this side too.
        found = None
        for _ in range(500):
            try:
                found = await intake.outcomes("bus-01", ["t-000001"])
                break
            except Busy:
                await asyncio.sleep(0.02)
        assert found is not None, "the bound never let go of the cancelled call"
        assert reasons(found) == ["ok"]
    finally:
        release.touch()
        intake.close()


def test_the_default_bound_holds_four_full_requests():
    """A serialized trip is 70-100 bytes: four requests of 10,000 fit the default bound."""
    one = len(trip_to_wire(trip(1, gate_id="g-17", place_id="route-3")).SerializeToString())
    assert 70 <= one <= 97
    assert 4 * 10_000 * (one + 3) <= MAX_QUEUED_BYTES  # + the field's tag and length
