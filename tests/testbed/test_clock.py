"""broker/testbed/clock.py: the day clock runs with the wall clock and only jumps forward."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from broker.testbed.clock import DayClock


def test_it_starts_at_the_wall_clock_and_keeps_running() -> None:
    clock = DayClock()
    before = datetime.now(UTC)
    first = clock()
    assert before <= first <= datetime.now(UTC)
    assert clock() >= first and clock().tzinfo is not None


def test_it_jumps_forward_and_runs_on_from_there() -> None:
    clock = DayClock()
    target = datetime.now(UTC) + timedelta(days=4)
    clock.move_to(target)
    assert target <= clock() < target + timedelta(seconds=5)


def test_it_never_goes_back() -> None:
    clock = DayClock()
    clock.move_to(datetime.now(UTC) + timedelta(days=2))
    with pytest.raises(ValueError, match="does not go back"):
        clock.move_to(datetime.now(UTC) + timedelta(days=1))
    assert clock() > datetime.now(UTC) + timedelta(days=1)


def test_reach_jumps_forward_or_stays_when_the_clock_is_past_it_already():
    clock = DayClock()
    clock.reach(datetime.now(UTC) - timedelta(minutes=20))  # already past: no error
    assert abs(clock() - datetime.now(UTC)) < timedelta(seconds=1)
    ahead = datetime.now(UTC) + timedelta(days=1)
    clock.reach(ahead)
    assert clock() >= ahead
