"""The supervisor of a node's background loops (broker/node/supervisor.py): none dies silently."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

import structlog.testing

from broker.node.supervisor import Supervisor, task_health_name


async def until(check: Callable[[], bool], within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        assert loop.time() < deadline, "not within time"
        await asyncio.sleep(0.01)


async def test_a_loop_that_raises_is_logged_reported_restarted_and_reported_again() -> None:
    runs: list[int] = []
    reports: list[tuple[str, bool]] = []

    async def loop() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            raise RuntimeError("unexpected")
        await asyncio.sleep(3600)

    async def on_change(name: str, ok: bool) -> None:
        reports.append((name, ok))

    sup = Supervisor(on_change=on_change, initial_backoff_s=0.05)
    with structlog.testing.capture_logs() as logs:
        sup.start("watch", loop)
        await until(lambda: len(runs) == 2)
    await sup.stop()
    name = task_health_name("watch")
    assert reports == [(name, True), (name, False), (name, True)]  # exists, failed, back
    [failed] = [e for e in logs if e["event"] == "task_failed"]
    assert failed["task"] == "watch" and failed["log_level"] == "error"
    assert failed.get("exc_info") is True  # logged with its traceback
    assert sup.failures["watch"] == 1 and sup.healthy["watch"] is True


async def test_a_loop_that_returns_is_restarted_too() -> None:
    runs: list[int] = []

    async def loop() -> None:
        runs.append(1)
        if len(runs) >= 3:
            await asyncio.sleep(3600)

    sup = Supervisor(initial_backoff_s=0.01)
    sup.start("refresh", loop)
    await until(lambda: len(runs) == 3)
    assert sup.failures["refresh"] == 2 and sup.running() == ["refresh"]
    await sup.stop()
    assert sup.running() == []


async def test_backoff_doubles_up_to_its_limit() -> None:
    starts: list[float] = []

    async def loop() -> None:
        starts.append(asyncio.get_running_loop().time())
        raise ValueError("again")

    sup = Supervisor(initial_backoff_s=0.02, max_backoff_s=0.08)
    sup.start("flaky", loop)
    await until(lambda: len(starts) >= 6, within=5)
    await sup.stop()
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps[0] >= 0.02 and gaps[1] >= 0.04 and gaps[2] >= 0.08
    assert all(g < 0.5 for g in gaps[3:5])  # capped at 0.08 s (plus scheduling)


async def test_a_failing_report_does_not_take_the_supervisor_down() -> None:
    runs: list[int] = []

    async def loop() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("boom")
        await asyncio.sleep(3600)

    async def on_change(name: str, ok: bool) -> None:
        raise OSError("health servicer gone")

    sup = Supervisor(on_change=on_change, initial_backoff_s=0.01)
    sup.start("x", loop)
    await until(lambda: len(runs) == 3)
    await sup.stop()


async def test_two_loops_of_one_name_are_refused() -> None:
    sup = Supervisor()

    async def loop() -> None:
        await asyncio.sleep(3600)

    sup.start("a", loop)
    try:
        import pytest

        with pytest.raises(ValueError, match="running already"):
            sup.start("a", loop)
    finally:
        await sup.stop()


async def test_stop_one_stops_that_loop_only_and_for_good() -> None:
    runs: dict[str, int] = {"a": 0, "b": 0}

    def loop_of(name: str) -> Any:
        async def loop() -> None:
            runs[name] += 1
            await asyncio.Event().wait()

        return loop

    sup = Supervisor(initial_backoff_s=0.01)
    sup.start("a", loop_of("a"))
    sup.start("b", loop_of("b"))
    await asyncio.sleep(0.05)
    await sup.stop_one("a")
    await sup.stop_one("nothing")  # no such loop: nothing happens
    await asyncio.sleep(0.05)
    assert sup.running() == ["b"] and runs == {"a": 1, "b": 1}
    await sup.stop()


async def test_a_loop_that_loses_its_cancellation_is_named_and_cancelled_again() -> None:
    """A library that swallows a cancellation (asyncio.wait_for on 3.11 did) must not keep
    the node from stopping."""
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.set()  # the first cancellation is lost
        await asyncio.sleep(3600)  # the second one ends it

    sup = Supervisor()
    sup.start("stubborn", stubborn)
    await asyncio.sleep(0)
    with structlog.testing.capture_logs() as logs:
        async with asyncio.timeout(5):
            await sup.stop(patience_s=0.05)
    assert swallowed.is_set() and sup.running() == []
    assert {
        "event": "task_ignored_cancellation",
        "task": "loop:stubborn",
        "log_level": "warning",
    } in logs
