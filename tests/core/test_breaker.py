"""The circuit breaker: open after failures in a row, one probe at a time, closed by a success."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.core.breaker import Breaker, State


def state(b: Breaker) -> State:
    """Read afresh (mypy would keep an earlier ``is`` check's narrowing across calls)."""
    return b.state


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_failures_in_a_row_open_it_and_a_success_between_starts_the_count_again():
    clock = Clock()
    b = Breaker(threshold=3, probe_s=0.5, clock=clock)
    b.failed()
    b.failed()
    b.succeeded()
    b.failed()
    b.failed()
    assert b.state is State.CLOSED and b.allow()
    b.failed()
    assert state(b) is State.OPEN
    assert not b.allow() and b.refused == 1
    assert b.retry_in_s() == pytest.approx(0.5)


def test_one_probe_goes_when_the_time_is_up_and_its_outcome_decides():
    clock = Clock()
    changes: list[tuple[State, State]] = []
    b = Breaker(
        threshold=1, probe_s=0.5, clock=clock, on_change=lambda o, n: changes.append((o, n))
    )
    b.failed()
    clock.now += 0.49
    assert not b.allow()
    clock.now += 0.01
    assert b.allow()  # the probe
    assert not b.allow()  # the others wait for it
    b.failed()  # the probe failed: open for another probe_s
    assert not b.allow()
    clock.now += 0.5
    assert b.allow()
    b.succeeded()
    assert b.state is State.CLOSED and b.allow() and b.retry_in_s() == 0
    assert changes == [
        (State.CLOSED, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.CLOSED),
    ]


@pytest.mark.parametrize(("threshold", "probe_s"), [(0, 1.0), (1, 0.0), (1, -1.0)])
def test_a_breaker_that_could_never_close_or_never_open_is_refused(threshold: int, probe_s: float):
    with pytest.raises(ValueError):
        Breaker(threshold=threshold, probe_s=probe_s)


@given(st.lists(st.sampled_from(["ok", "fail", "call", "wait"]), max_size=60))
def test_while_open_no_call_goes_before_its_time_and_at_most_one_probe_at_once(steps: list[str]):
    clock = Clock()
    b = Breaker(threshold=2, probe_s=0.5, clock=clock)
    probes_out = 0
    for step in steps:
        if step == "wait":
            clock.now += 0.3
        elif step == "call":
            was = b.state
            if b.allow():
                if was is not State.CLOSED:
                    probes_out += 1
                    assert probes_out == 1  # never a second probe before the first's outcome
            else:
                assert b.state is not State.CLOSED
        elif step == "ok":
            b.succeeded()
            probes_out = 0
        else:
            b.failed()
            probes_out = 0
