"""The peer's side of pushed status changes: each process follows each peer home's log.

Every process of every replica runs one :class:`StatusWatcher` per peer
district (rather than one per district relaying through Redis pub/sub): a
process's in-process tier is updated by its own stream, so no process waits
on another, and nothing depends on Redis being up for a lost card to be
refused. The Redis tier is updated by every watcher (compare-and-set makes
that idempotent), and the cursor is kept in Redis too, shared by the
district's processes: a process that starts resumes where they were, so
changes made while all were down still reach the answers left in Redis.
Without Redis a process starts with no cursor, and the home has it start
afresh (its in-process tier is empty anyway).

A rewind from the home (no cursor, a reset or restored log, a cursor older
than the changes it keeps), or an update that does not read, drops every
answer of that district in both tiers, after setting a floor below which
no answer read earlier may be cached. A stream that ends is resumed from
the last position applied, at once the first time and then with backoff.

Redis failing meanwhile never holds back the in-process tier: changes are
applied there and followed on; Redis is marked as possibly stale, the
cursor is no longer saved there, and once Redis answers again that home's
answers in it are dropped (and the cursor saved again).
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import structlog

from broker.cards.model import LogPosition
from broker.cards.updates import Change, Rewind, Update
from broker.core.errors import InvalidArgument, PeerUnavailable
from broker.gate.cache import AnswerCache
from broker.gate.redis_tier import TierFailed
from broker.peers.client import PeerClient

log = structlog.get_logger(__name__)

FIRST_RETRY_S = 0.05
MAX_RETRY_S = 2.0
REPAIR_S = 1.0


class StatusWatcher:
    """Follows ``district``'s ``WatchStatus`` stream for this process (:meth:`run`)."""

    def __init__(
        self,
        district: str,
        client: PeerClient,
        cache: AnswerCache,
        first_retry_s: float = FIRST_RETRY_S,
        max_retry_s: float = MAX_RETRY_S,
        repair_s: float = REPAIR_S,
    ) -> None:
        self.district = district
        self._client = client
        self._cache = cache
        self._first = first_retry_s
        self._max = max_retry_s
        self._repair_s = repair_s
        # Redis may hold answers a change did not reach (it failed meanwhile): repaired by
        # dropping that home's answers there once it answers again.
        self.redis_dirty = False
        self.repairs = 0
        self.cursor: LogPosition | None = None
        self.applied = 0  # changes applied to the cache
        self.flushes = 0
        self.streams = 0  # streams opened (the first, and each resumption)
        self.connected = asyncio.Event()  # set while a stream is delivering

    async def run(self) -> None:
        """Forever: follow, apply, resume (and repair Redis after it failed)."""
        try:
            self.cursor = await self._cache.cursor(self.district)
        except TierFailed:  # Redis cannot say where we were: start afresh, repair it later
            self.cursor, self.redis_dirty = None, True
        repair = asyncio.ensure_future(self._repair())
        try:
            await self._follow()
        finally:
            repair.cancel()
            await asyncio.gather(repair, return_exceptions=True)

    async def _follow(self) -> None:
        loop = asyncio.get_running_loop()
        delay, broken = 0.0, False
        while True:
            opened = loop.time()
            self.streams += 1
            try:
                stream = self._client.watch_status(self.district, self.cursor)
                async with aclosing(stream):  # its call is cancelled however this ends
                    async for update in stream:
                        await self._apply(update)
                        if broken:
                            log.info("status_watch_resumed", district=self.district)
                        delay, broken = 0.0, False
            except PeerUnavailable as exc:
                if not broken and self.cursor is None:  # never followed yet: the peer may
                    log.info("status_watch_waiting", district=self.district, reason=exc.reason)
                elif not broken:  # start after us; a break once followed is worth a warning
                    log.warning("status_watch_broken", district=self.district, reason=exc.reason)
                broken = True
            except InvalidArgument as exc:  # an update we cannot apply: start afresh
                log.warning("status_update_unreadable", district=self.district, field=exc.field)
                if self.cursor is not None:  # a change after the cursor may be missed
                    await self._flush(self.cursor, keep_floor=False)
                self.cursor = None
            self.connected.clear()
            self._cache.following.discard(self.district)
            if loop.time() - opened > self._max:
                delay = 0.0  # a stream that lasted (aged out, say): resume at once
            await asyncio.sleep(delay)
            delay = min(max(delay * 2, self._first), self._max)

    async def _apply(self, update: Update) -> None:
        self.connected.set()
        self._cache.following.add(self.district)
        if isinstance(update, Rewind):
            await self._flush(update.position)
        elif isinstance(update, Change):
            key = f"{self.district}:{update.handle}"
            if not await self._cache.apply(key, update.status, update.position):
                self.redis_dirty = True  # the in-process tier has it; Redis may not
            self.applied += 1
        self.cursor = update.position
        if not self.redis_dirty:  # never past a change Redis may have missed
            await self._cache.save_cursor(self.district, update.position)

    async def _flush(self, floor: LogPosition, keep_floor: bool = True) -> None:
        if not await self._cache.flush(self.district, floor, keep_floor=keep_floor):
            self.redis_dirty = True
        self.flushes += 1

    async def _repair(self) -> None:
        """While Redis may hold answers this process could not correct (it failed while a
        change or a flush was applied), try every ``repair_s`` to drop that home's answers
        there; then the cursor is saved again."""
        while True:
            await asyncio.sleep(self._repair_s)
            if not self.redis_dirty or self.cursor is None:
                continue
            if await self._cache.flush(self.district, self.cursor, local=False):
                self.redis_dirty = False
                self.repairs += 1
                await self._cache.save_cursor(self.district, self.cursor)
