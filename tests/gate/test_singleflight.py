"""Single-flight: one call per key however many ask at once."""

from __future__ import annotations

import asyncio

import pytest

from broker.gate.singleflight import SingleFlight


async def test_concurrent_callers_share_one_call():
    flights: SingleFlight[str, int] = SingleFlight()
    calls = 0
    release = asyncio.Event()

    async def call() -> int:
        nonlocal calls
        calls += 1
        await release.wait()
        return 42

    tasks = [asyncio.create_task(flights.do("k", call)) for _ in range(50)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*tasks)
    assert calls == 1
    assert {r for r, _ in results} == {42}
    assert sum(shared for _, shared in results) == 49
    assert len(flights) == 0


async def test_an_error_reaches_every_waiter_and_is_not_kept():
    flights: SingleFlight[str, int] = SingleFlight()
    calls = 0

    async def boom() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        raise RuntimeError("peer down")

    results = await asyncio.gather(
        *(flights.do("k", boom) for _ in range(5)), return_exceptions=True
    )
    assert calls == 1 and all(isinstance(r, RuntimeError) for r in results)
    with pytest.raises(RuntimeError):
        await flights.do("k", boom)
    assert calls == 2


async def test_a_cancelled_leader_does_not_cancel_the_others():
    flights: SingleFlight[str, int] = SingleFlight()

    async def slow() -> int:
        await asyncio.sleep(0.05)
        return 7

    leader = asyncio.create_task(flights.do("k", slow))
    await asyncio.sleep(0)
    follower = asyncio.create_task(flights.do("k", slow))
    await asyncio.sleep(0)
    leader.cancel()
    assert await follower == (7, True)
