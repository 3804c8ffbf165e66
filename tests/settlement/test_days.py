"""broker/settlement/days.py: a day's end and late window in Asia/Shanghai, and the refusals."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.cards.model import shanghai_day
from broker.core.errors import SettlementStateError
from broker.settlement.days import day_end, require_ended, require_window_closed, window_end

DAY = date(2026, 3, 10)


def test_a_day_ends_at_the_next_midnight_in_shanghai() -> None:
    assert day_end(DAY) == datetime(2026, 3, 10, 16, 0, tzinfo=UTC)  # 00:00 +08:00 on the 11th


def test_the_late_window_is_72_hours_and_5_minutes_of_skew_after_the_end() -> None:
    assert window_end(DAY) == datetime(2026, 3, 13, 16, 5, tzinfo=UTC)
    assert window_end(DAY, timedelta(hours=24)) == datetime(2026, 3, 11, 16, 5, tzinfo=UTC)


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)))
def test_every_instant_of_a_day_is_before_its_end_and_the_end_is_the_next_day(
    naive: datetime,
) -> None:
    at = naive.replace(tzinfo=UTC)
    day = shanghai_day(at)
    assert at < day_end(day)
    assert shanghai_day(day_end(day)) == day + timedelta(days=1)
    assert shanghai_day(day_end(day) - timedelta(microseconds=1)) == day


def test_a_close_before_the_day_ends_is_refused_saying_when_it_ends() -> None:
    with pytest.raises(
        SettlementStateError,
        match=r"cannot close 2026-03-10: the day has not ended; it ends at 2026-03-11T00:00\+08:00",
    ):
        require_ended(DAY, day_end(DAY) - timedelta(microseconds=1), "close")
    require_ended(DAY, day_end(DAY), "close")  # at midnight it has ended


def test_a_confirmation_inside_the_late_window_is_refused_as_provisional() -> None:
    with pytest.raises(SettlementStateError, match=r"provisional until .*2026-03-14T00:05\+08:00"):
        require_window_closed(DAY, window_end(DAY) - timedelta(seconds=1))
    require_window_closed(DAY, window_end(DAY))
