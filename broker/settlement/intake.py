"""Trip intake: judge each submitted trip and record it in the ledger, off the event loop.

Judging and writing run on one writer thread; the queue in front of it is bounded
(:data:`MAX_QUEUED_TRIPS`): beyond it a request is refused at once as busy, with a
retry hint, rather than queued without end while gates wait on the same process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

from broker.core.errors import Busy
from broker.fares.rules import CHANGEOVER_GRACE, FareSchedule
from broker.settlement.ledger import Ledger
from broker.settlement.trips import DEFAULT_LATE_WINDOW, Judgement, Trip, judge

MAX_TRIPS_PER_REQUEST = 10_000
# Trips accepted into the writer's queue and not yet committed: beyond it a request is
# refused RESOURCE_EXHAUSTED with a retry hint (back-pressure: the gate's checks come first).
MAX_QUEUED_TRIPS = 4 * MAX_TRIPS_PER_REQUEST
RETRY_AFTER_S = 1.0


class TripIntake:
    """Judges and records trips for one district; every write happens on one writer thread."""

    def __init__(
        self,
        ledger: Ledger,
        known_districts: frozenset[str],
        fares: FareSchedule | None,
        clock: Callable[[], datetime],
        late_window: timedelta = DEFAULT_LATE_WINDOW,
        changeover_grace: timedelta = CHANGEOVER_GRACE,
        max_queued: int = MAX_QUEUED_TRIPS,
    ) -> None:
        self._ledger = ledger
        self._max_queued = max_queued
        self._queued = 0  # trips of requests in the writer's queue or being written
        self._known = known_districts
        self._fares = fares
        self._clock = clock
        self._late = late_window
        self._grace = changeover_grace
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-writer")

    def admit(self, n: int) -> None:
        """Refuse at once, as busy, a request of ``n`` trips that would overfill the queue
        (before it is decoded: a refused request should cost the node nothing)."""
        if self._queued and self._queued + n > self._max_queued:
            raise Busy(f"{self._queued} trips are waiting to be recorded", RETRY_AFTER_S)

    async def submit(self, items: Sequence[Trip | Judgement]) -> list[Judgement]:
        """Judge and durably record ``items``; a ``Judgement`` (a malformed line) passes through.

        Returns one judgement per item, in order, once the batch is committed.
        """
        n = len(items)
        self.admit(n)
        self._queued += n
        try:
            now = self._clock()
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._writer, self._judge_and_record, items, now)
        finally:
            self._queued -= n

    def _judge_and_record(
        self, items: Sequence[Trip | Judgement], now: datetime
    ) -> list[Judgement]:
        """On the writer thread, off the event loop: judging 10,000 trips takes a while."""
        judged = [
            (t, judge(t, now, self._known, self._fares, self._late, self._grace))
            for t in items
            if isinstance(t, Trip)
        ]
        stored = iter(self._ledger.record(judged, now))
        return [next(stored) if isinstance(t, Trip) else t for t in items]

    async def outcomes(self, operator_id: str, trip_ids: Sequence[str]) -> list[Judgement | None]:
        loop = asyncio.get_running_loop()

        def read() -> list[Judgement | None]:
            return [self._ledger.outcome(operator_id, t) for t in trip_ids]

        return await loop.run_in_executor(self._writer, read)

    async def reachable(self) -> bool:
        """Whether the ledger answers a trivial query (on the writer thread, behind writes)."""
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(self._writer, self._ledger.ping), timeout=5
            )
        except Exception:  # any failure is "not reachable"; the node logs the change
            return False

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._ledger.close()
