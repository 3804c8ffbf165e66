"""Settlement days: when a day ends, when its late window closes, and the refusals before then.

A settlement day is a calendar day in Asia/Shanghai. Operators may submit a
trip up to the late window (72 h) after it occurred; with the allowed clock
skew, no trip of a day can arrive after the day's end + 72 h + 5 min. A day
can be closed (its batches sent) once it has ended, and confirmed (SETTLED)
only after its window has closed *and* a close has run after that (the close
that seals the day in the ledger, see :func:`broker.settlement.ledger.store.seal_day`).
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta

from broker.cards.model import SHANGHAI
from broker.core.errors import SettlementStateError
from broker.settlement.trips import CLOCK_SKEW, DEFAULT_LATE_WINDOW


def day_end(period: date) -> datetime:
    """The instant ``period`` ends: the next midnight in Asia/Shanghai."""
    return datetime.combine(period + timedelta(days=1), time(0), tzinfo=SHANGHAI)


def window_end(period: date, late_window: timedelta = DEFAULT_LATE_WINDOW) -> datetime:
    """The instant after which no trip of ``period`` can be accepted any more."""
    return day_end(period) + late_window + CLOCK_SKEW


def shown(at: datetime) -> str:
    """An instant as operators read it: Shanghai wall time with its offset."""
    return at.astimezone(SHANGHAI).isoformat(timespec="minutes")


def require_ended(period: date, now: datetime, what: str) -> None:
    """Refuse ``what`` (a close or a confirmation) for a day that has not ended."""
    end = day_end(period)
    if now < end:
        raise SettlementStateError(
            f"cannot {what} {period.isoformat()}: the day has not ended; it ends at {shown(end)}"
        )


def require_window_closed(
    period: date, now: datetime, late_window: timedelta = DEFAULT_LATE_WINDOW
) -> None:
    """Refuse to confirm a day whose late window is still open (its figures are provisional)."""
    end = window_end(period, late_window)
    if now < end:
        raise SettlementStateError(
            f"cannot confirm {period.isoformat()}: its figures are provisional until the late "
            f"window closes at {shown(end)}, and a close has run after that"
        )
