"""StateLog (broker/core/quiet.py): a failing dependency logs changes of state, not calls."""

from __future__ import annotations

import structlog
from structlog.testing import capture_logs

from broker.core.quiet import StateLog


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_thousand_failures_are_one_line_then_a_count_a_minute_then_one_recovery():
    clock = Clock()
    state = StateLog(structlog.get_logger("t"), "redis", every_s=60, clock=clock, tier="shared")
    with capture_logs() as events:
        for _ in range(1000):
            state.failed("ConnectionError")
        clock.now = 59.9
        state.failed("ConnectionError")
        clock.now = 61
        state.failed("TimeoutError")
        for _ in range(10):
            state.failed("TimeoutError")
        state.ok()
        state.ok()
        state.failed("ConnectionError")
    assert [(e["event"], e["log_level"]) for e in events] == [
        ("redis_failing", "warning"),
        ("redis_still_failing", "warning"),
        ("redis_recovered", "info"),
        ("redis_failing", "warning"),
    ]
    assert events[1]["failures"] == 1001 and events[1]["seconds"] == 61.0
    assert events[2]["failures"] == 1012
    assert all(e["tier"] == "shared" for e in events)
    assert state.failing and state.failures == 1
