"""The peer's watcher (broker.gate.watch): applies what the home pushes, resumes, flushes.

The client is a stand-in here (the stream's script): the watcher's own logic, on a real
in-process cache. tests/e2e/test_lost_card.py runs it against real nodes and Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

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
