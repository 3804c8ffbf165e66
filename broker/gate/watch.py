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
answer of that district in both tiers. A stream that ends is resumed from
the last position applied, at once the first time and then with backoff.
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import structlog

from broker.cards.model import LogPosition
from broker.cards.updates import Change, Rewind, Update
from broker.core.errors import InvalidArgument, PeerUnavailable
from broker.gate.cache import AnswerCache
from broker.peers.client import PeerClient

log = structlog.get_logger(__name__)

FIRST_RETRY_S = 0.05
MAX_RETRY_S = 2.0


class StatusWatcher:
    """Follows ``district``'s ``WatchStatus`` stream for this process (:meth:`run`)."""

    def __init__(
        self,
        district: str,
        client: PeerClient,
        cache: AnswerCache,
        first_retry_s: float = FIRST_RETRY_S,
        max_retry_s: float = MAX_RETRY_S,
    ) -> None:
        self.district = district
        self._client = client
        self._cache = cache
        self._first = first_retry_s
        self._max = max_retry_s
        self.cursor: LogPosition | None = None
        self.applied = 0  # changes applied to the cache
        self.flushes = 0
        self.streams = 0  # streams opened (the first, and each resumption)
        self.connected = asyncio.Event()  # set while a stream is delivering

    async def run(self) -> None:
        """Forever: follow, apply, resume."""
        self.cursor = await self._cache.cursor(self.district)
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
                await self._flush()
                self.cursor = None
            self.connected.clear()
            if loop.time() - opened > self._max:
                delay = 0.0  # a stream that lasted (aged out, say): resume at once
            await asyncio.sleep(delay)
            delay = min(max(delay * 2, self._first), self._max)

    async def _apply(self, update: Update) -> None:
        self.connected.set()
        if isinstance(update, Rewind):
            await self._flush()
        elif isinstance(update, Change):
            await self._cache.apply(
                f"{self.district}:{update.handle}", update.status, update.position
            )
            self.applied += 1
        self.cursor = update.position
        await self._cache.save_cursor(self.district, update.position)

    async def _flush(self) -> None:
        await self._cache.flush(self.district)
        self.flushes += 1
