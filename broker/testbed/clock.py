"""A clock a testbed moves on: the demo and the end-to-end tests run a settlement day on it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


class DayClock:
    """A clock the demo and the end-to-end tests move on: the wall clock, then jumped forward.

    Nodes (``Node.start(cfg, clock)``) and the ``broker settle`` commands
    (:func:`run_cli` with ``clock=``) share one, so a test can run a settlement
    day, then close it after midnight and confirm it after its late window
    without waiting 72 hours. Time keeps flowing between jumps.
    """

    def __init__(self) -> None:
        self._offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self._offset

    def move_to(self, at: datetime) -> None:
        """Jump to ``at``; never backwards (a clock that goes back is another test)."""
        offset = at - datetime.now(UTC)
        if offset < self._offset:
            raise ValueError(f"the day clock does not go back (to {at.isoformat()})")
        self._offset = offset

    def reach(self, at: datetime) -> None:
        """Be at ``at`` or later: jump there, or stay if the clock is past it already (in
        the first minutes after a midnight, "the next morning" of a day's trips made half
        an hour ago is already here)."""
        if at > self():
            self.move_to(at)
