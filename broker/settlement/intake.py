"""Trip intake: judge each submitted trip and record it in the ledger, off the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

from broker.fares.rules import CHANGEOVER_GRACE, FareSchedule
from broker.settlement.ledger import Ledger
from broker.settlement.trips import DEFAULT_LATE_WINDOW, Judgement, Trip, judge

MAX_TRIPS_PER_REQUEST = 10_000


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
    ) -> None:
        self._ledger = ledger
        self._known = known_districts
        self._fares = fares
        self._clock = clock
        self._late = late_window
        self._grace = changeover_grace
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-writer")

    async def submit(self, items: Sequence[Trip | Judgement]) -> list[Judgement]:
        """Judge and durably record ``items``; a ``Judgement`` (a malformed line) passes through.

        Returns one judgement per item, in order, once the batch is committed.
        """
        now = self._clock()
        judged = [
            (t, judge(t, now, self._known, self._fares, self._late, self._grace))
            for t in items
            if isinstance(t, Trip)
        ]
        loop = asyncio.get_running_loop()
        stored = iter(await loop.run_in_executor(self._writer, self._ledger.record, judged, now))
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
