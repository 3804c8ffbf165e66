"""The peer's watcher (broker.gate.watch): applies what the home pushes, resumes, flushes.

The client is a stand-in here (the stream's script): the watcher's own logic, on a real
in-process cache. tests/e2e/test_lost_card.py runs it against real nodes and Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from broker.cards.model import CardStatus, LogPosition, Recognition
from broker.cards.updates import Change, Progress, Rewind, Update
from broker.core.errors import InvalidArgument, PeerUnavailable
from broker.gate.cache import AnswerCache
from broker.gate.config import CacheConfig
from broker.gate.watch import StatusWatcher

HOME = "512021"
H = "0f" * 16
E = "ab" * 16


def at(seq: int) -> LogPosition:
    return LogPosition(E, seq, f"{seq:032x}" if seq else "")


class Script:
    """Each call to watch_status plays the next list of steps (an update, or an error)."""

    def __init__(self, *streams: list[Update | Exception]) -> None:
        self.streams = list(streams)
        self.asked: list[LogPosition | None] = []
        self.done = asyncio.Event()

    async def watch_status(self, district: str, after: LogPosition | None) -> AsyncIterator[Update]:
        assert district == HOME
        self.asked.append(after)
        if not self.streams:
            self.done.set()
            await asyncio.Event().wait()  # the last stream stays open
        for step in self.streams.pop(0):
            if isinstance(step, Exception):
                raise step
            yield step
        raise PeerUnavailable(HOME, "watch ended")


async def play(script: Script, cache: AnswerCache) -> StatusWatcher:
    watcher = StatusWatcher(HOME, script, cache, first_retry_s=0.001)  # type: ignore[arg-type]
    task = asyncio.ensure_future(watcher.run())
    try:
        async with asyncio.timeout(5):
            await script.done.wait()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return watcher


def cache_with(seq: int) -> AnswerCache:
    cache = AnswerCache(CacheConfig(redis_url=None), None)
    cache.local.put(
        f"{HOME}:{H}", Recognition(CardStatus.ACTIVE, (), 120, at(seq)), 120, time.monotonic()
    )
    return cache


async def test_a_pushed_loss_is_the_cached_answer_and_the_stream_resumes_after_it():
    cache = AnswerCache(CacheConfig(redis_url=None), None)
    script = Script(
        [Rewind(at(3)), Change(at(4), H, CardStatus.LOST), Progress(at(6))],
        [Progress(at(6))],
    )
    watcher = await play(script, cache)
    got = cache.get_local(f"{HOME}:{H}")
    assert got is not None and got.status is CardStatus.LOST
    assert script.asked == [None, at(6), at(6)]  # resumed where it was, each time
    assert (watcher.applied, watcher.flushes, watcher.cursor) == (1, 1, at(6))


async def test_a_rewind_drops_every_answer_of_that_home():
    cache = cache_with(2)
    other = "500223:" + H
    cache.local.put(other, Recognition(CardStatus.ACTIVE, (), 120), 120, time.monotonic())
    await play(Script([Rewind(LogPosition("cd" * 16, 0, ""))]), cache)
    assert cache.get_local(f"{HOME}:{H}") is None
    assert cache.get_local(other) is not None  # another district's answers stay


async def test_an_update_that_does_not_read_drops_the_homes_answers_and_starts_afresh():
    cache = cache_with(2)
    script = Script([Progress(at(2)), InvalidArgument("change.handle", "odd")])
    watcher = await play(script, cache)
    assert cache.get_local(f"{HOME}:{H}") is None
    assert script.asked == [None, None]  # no cursor: the home makes it start at its head
    assert watcher.flushes == 1


async def test_a_change_older_than_the_answer_held_does_not_replace_it():
    cache = cache_with(9)
    await play(Script([Change(at(4), H, CardStatus.LOST)]), cache)
    got = cache.get_local(f"{HOME}:{H}")
    assert got is not None and got.status is CardStatus.ACTIVE


async def test_redis_failing_never_holds_back_this_process_and_is_repaired_when_back(
    redis_db: str,
):
    """Redis is down while a loss is pushed: the in-process tier refuses the card at once,
    the cursor is not saved past it, and when Redis answers again that home's answers
    there (which the loss could not reach) are dropped and the cursor saved."""
    dead = CacheConfig(redis_url="redis://127.0.0.1:1/0", redis_timeout_ms=50)
    cache = AnswerCache.from_config(dead, "500111")
    working = AnswerCache.from_config(CacheConfig(redis_url=redis_db), "500111")
    stale_key = f"{HOME}:{'1e' * 16}"
    await working.put(stale_key, Recognition(CardStatus.ACTIVE, (), 120, at(1)))
    script = Script([Progress(at(1)), Change(at(2), H, CardStatus.LOST)])
    watcher = StatusWatcher(HOME, script, cache, first_retry_s=0.001, repair_s=0.05)  # type: ignore[arg-type]
    dead_tier = cache.remote
    task = asyncio.ensure_future(watcher.run())
    try:
        async with asyncio.timeout(5):
            await script.done.wait()
        got = cache.get_local(f"{HOME}:{H}")
        assert got is not None and got.status is CardStatus.LOST
        assert watcher.redis_dirty and watcher.cursor == at(2)
        assert await working.cursor(HOME) is None  # never saved while Redis was down
        cache.remote = working.remote  # Redis is back
        await until(lambda: watcher.repairs > 0)
        assert not watcher.redis_dirty
        assert await working.cursor(HOME) == at(2)
        fresh = AnswerCache.from_config(
            CacheConfig(redis_url=redis_db, local_max_entries=0), "500111"
        )
        try:
            assert await fresh.get(stale_key) is None  # dropped: it could have been stale
        finally:
            await fresh.close()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        cache.remote = dead_tier
        await cache.close()
        await working.close()


async def until(holds: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while True:
            if holds():
                return
            await asyncio.sleep(0.01)
