"""Caching peer districts' answers: a bounded in-process tier in front of Redis.

Keys are ``<issuer district>:<keyed hash of the card>`` (see
:mod:`broker.cards.privacy`), so neither tier ever holds a raw card number,
and the hash alone is also this node's *handle* for the card at its home
(the home pushes changes by it). The Redis tier is shared by every replica
of a district; the in-process tier keeps each replica's hot cards a
dictionary lookup away. An entry expires at the same instant in both tiers:
a replica that fills its local tier from Redis keeps the entry only for the
time Redis has left, and no entry outlives midnight in Asia/Shanghai.

Every entry carries the home's log position of what it says (the answer's,
or a pushed change's). A write never replaces an entry of a later position
of the same epoch — in the local tier by comparison, in Redis by a Lua
compare-and-set — so a slow ACTIVE answer that arrives after a pushed LOST
cannot bring the card back. A pushed refusal is written as the answer (the
card is refused at once, from cache); a pushed ACTIVE only invalidates: its
entry is a *tombstone* that reads as a miss and still holds its position.

Redis failures never fail a gate check: a slow or broken Redis counts as a
miss, and the node carries on asking peers; it is logged when it starts
failing, once a minute with a count while it does, and when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import redis.asyncio as aioredis
import structlog

from broker.cards.model import (
    CardStatus,
    LogPosition,
    Recognition,
    Scene,
    seconds_to_shanghai_midnight,
)
from broker.gate.config import CacheConfig
from broker.gate.entries import Entry, may_replace
from broker.gate.redis_tier import RedisTier

log = structlog.get_logger(__name__)

# A pushed change is kept at least this long, though no answer about the card is cached:
# an answer in flight when it arrived must still find it (and lose to it). A peer call
# may take up to 60 s ([peering] deadline_ms at its largest), plus clock skew.
TOMBSTONE_MIN_S = 65
# How long an answer of a home whose changes are not being followed now is kept (the
# stream is down, refused, or not yet open): what a lost card may still be let in for.
UNFOLLOWED_TTL_S = 10
# Writes to Redis waiting behind the requests that made them (broker.gate.cache.WriteBehind).
WRITE_QUEUE = 10_000


class LocalTier:
    """Bounded LRU of entries with per-entry expiry on the monotonic clock."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, Entry]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, key: str, now: float) -> Entry | None:
        item = self._entries.get(key)
        if item is None:
            return None
        expires, entry = item
        if now >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def get(self, key: str, now: float) -> Recognition | None:
        """The cached answer (a tombstone reads as a miss)."""
        entry = self.entry(key, now)
        return entry.rec if entry is not None else None

    def put(self, key: str, rec: Recognition, ttl: float, now: float) -> bool:
        """Keep ``rec`` (with its position) unless a later entry is held; whether kept."""
        return self.put_entry(key, Entry.of(rec, rec.position), ttl, now)

    def put_entry(self, key: str, entry: Entry, ttl: float, now: float) -> bool:
        if self.max_entries <= 0 or ttl <= 0:
            return False
        if not may_replace(entry, self.entry(key, now)):
            return False
        self._entries[key] = (now + ttl, entry)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return True

    def expiry(self, key: str) -> float | None:
        item = self._entries.get(key)
        return item[0] if item is not None else None

    def discard(self, key: str) -> None:
        self._entries.pop(key, None)

    def discard_if(self, key: str, entry: Entry) -> None:
        """Forget ``key`` if it still holds ``entry``."""
        item = self._entries.get(key)
        if item is not None and item[1] is entry:
            del self._entries[key]

    def drop_prefix(self, prefix: str, keep: LogPosition | None = None) -> int:
        """Forget every entry whose key starts with ``prefix`` (one district's), but those
        read at exactly ``keep`` (what the home's log stood at when it said to drop the
        rest: nothing can have changed since they were read); how many."""
        gone = [
            k
            for k, (_, e) in self._entries.items()
            if k.startswith(prefix) and (keep is None or (e.epoch, e.seq) != (keep.epoch, keep.seq))
        ]
        for k in gone:
            del self._entries[k]
        return len(gone)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _stale(entry: Entry | None, now_ms: int, limit_s: int) -> tuple[Recognition, bool] | None:
    """``entry``'s answer as a stale one, if it is at most ``limit_s`` past its freshness."""
    if entry is None or entry.rec is None or entry.fresh_until_ms == 0:
        return None
    if now_ms >= entry.fresh_until_ms + limit_s * 1000:
        return None
    return entry.rec, True


class WriteBehind:
    """Writes to Redis off the request path: a bounded queue, drained by one task.

    A gate check that asked a peer answers as soon as the answer is in this
    process's tier; sharing it with the other replicas follows. When the queue
    is full (Redis slow, and the breaker not yet open) a write is dropped and
    counted: the answer is still cached here, and another replica that misses
    it asks the peer itself.
    """

    def __init__(self, limit: int = WRITE_QUEUE) -> None:
        self._limit = limit
        self._jobs: deque[Callable[[], Awaitable[None]]] = deque()
        self._ready: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._idle: asyncio.Event | None = None
        self.dropped = 0

    def submit(self, job: Callable[[], Awaitable[None]]) -> None:
        if len(self._jobs) >= self._limit:
            self.dropped += 1
            return
        if self._task is None:
            self._ready, self._idle = asyncio.Event(), asyncio.Event()
            self._task = asyncio.ensure_future(self._drain())
        assert self._ready is not None and self._idle is not None
        self._jobs.append(job)
        self._idle.clear()
        self._ready.set()

    async def _drain(self) -> None:
        assert self._ready is not None and self._idle is not None
        while True:
            await self._ready.wait()
            while self._jobs:
                job = self._jobs.popleft()
                try:
                    await job()
                except Exception as exc:  # a write that failed is a write not made
                    log.debug("cache_write_failed", error=type(exc).__name__)
            self._ready.clear()
            self._idle.set()

    def __len__(self) -> int:
        return len(self._jobs)

    async def settled(self) -> None:
        """Until every write submitted so far is done (or dropped)."""
        if self._idle is not None:
            await self._idle.wait()

    async def close(self, drain_s: float = 1.0) -> None:
        """Finish what is queued (``drain_s`` at most), then stop."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(drain_s):
                await self.settled()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


class AnswerCache:
    """The two tiers together. Callers see ``get``, ``put``, and ``apply`` for pushes."""

    def __init__(
        self,
        cfg: CacheConfig,
        remote: RedisTier | None,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        """``wall``: the node's clock, for the midnight every entry ends by."""
        self._cfg = cfg
        self.local = LocalTier(cfg.local_max_entries)
        self.remote = remote
        self._wall = wall
        # Per home: no answer below this position (or of another epoch) is cached here,
        # nor read from Redis (set when the home's answers were all dropped).
        self.floors: dict[str, LogPosition] = {}
        # Homes whose changes this process is following now (broker.gate.watch): an answer
        # from any other that could be pushed is kept only briefly, since no push would
        # reach it.
        self.following: set[str] = set()
        self.writes = WriteBehind()
        self._mono: Callable[[], float] = time.monotonic  # the in-process tier's clock

    @classmethod
    def from_config(
        cls,
        cfg: CacheConfig,
        district: str,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> AnswerCache:
        remote = None
        if cfg.redis_url:
            timeout = cfg.redis_timeout_ms / 1000
            client = aioredis.Redis.from_url(
                cfg.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout
            )
            remote = RedisTier(client, district, timeout)
        return cls(cfg, remote, wall)

    def ttl_for(self, rec: Recognition) -> int:
        """Seconds to keep an answer: the home district's TTL, bounded by ours and by the
        next midnight in Asia/Shanghai."""
        ttl = min(rec.ttl_seconds, self._cfg.max_ttl_seconds)
        if rec.status is CardStatus.UNKNOWN:
            ttl = min(ttl, self._cfg.unknown_ttl_seconds)
        return max(min(ttl, seconds_to_shanghai_midnight(self._wall())), 0)

    def stale_limit(self, scene: Scene) -> int:
        """Seconds past its TTL an answer may be served at ``scene`` (``[cache]``)."""
        return self._cfg.stale_limit(scene)

    def get_local(self, key: str) -> Recognition | None:
        """A fresh answer from the in-process tier alone: no await, for the hot path."""
        entry = self.local.entry(key, self._mono())
        if entry is None or entry.rec is None or not entry.fresh(_now_ms()):
            return None
        return entry.rec

    async def get(self, key: str) -> Recognition | None:
        """A fresh answer from either tier (see :meth:`lookup`)."""
        found = await self.lookup(key, 0)
        return found[0] if found is not None and not found[1] else None

    async def lookup(self, key: str, stale_limit_s: int) -> tuple[Recognition, bool] | None:
        """``(answer, stale)``: a fresh answer, or one past its TTL by at most
        ``stale_limit_s`` (and within what its home allows: the entry's life); local
        tier first, then Redis (filling the local tier for the time Redis has left), where
        another replica may hold a fresher one.

        A tombstone here (a pushed change) also stands against Redis: an entry there
        older than it (its write lost the race, or failed) is a miss.
        """
        now_ms = _now_ms()
        held = self.local.entry(key, self._mono())
        if held is not None and held.rec is not None and held.fresh(now_ms):
            return held.rec, False
        stale = _stale(held, now_ms, stale_limit_s)
        if self.remote is None:
            return stale
        found = await self.remote.get(key)
        if found is None:
            return stale
        entry, expires_at_ms = found
        if held is not None and not may_replace(entry, held):
            return stale
        if self._below_floor(key, entry):
            return stale
        left = expires_at_ms / 1000 - time.time()
        if left <= 0:
            return stale
        self.local.put_entry(key, entry, left, self._mono())
        if entry.rec is not None and entry.fresh(now_ms):
            return entry.rec, False
        return _stale(entry, now_ms, stale_limit_s)

    async def put(self, key: str, rec: Recognition) -> None:
        """Cache a home's answer, unless either tier holds a later position: in this
        process's tier at once, in Redis behind the request (:class:`WriteBehind`)."""
        ttl = self.ttl_for(rec)
        followed = rec.position is None or key.split(":", 1)[0] in self.following
        if not followed:
            ttl = min(ttl, UNFOLLOWED_TTL_S)
        if ttl <= 0:
            return
        # Then stale, as long as its home allows and some scene would serve it: not an
        # UNKNOWN (asked again soon), nor an answer no push could reach.
        stale = 0
        if followed and rec.status is not CardStatus.UNKNOWN:
            stale = min(rec.max_stale_seconds, self._cfg.longest_stale)
        hold = max(min(ttl + stale, seconds_to_shanghai_midnight(self._wall())), ttl)
        now_ms = _now_ms()
        entry = Entry.of(rec, rec.position, now_ms + ttl * 1000 if hold > ttl else 0)
        if self._below_floor(key, entry):
            return  # read before this home's answers were dropped: it may miss a change
        kept = self.local.put_entry(key, entry, hold, self._mono())
        if self.remote is not None:
            expires_at_ms = now_ms + hold * 1000
            self.writes.submit(lambda: self._share(key, entry, hold, expires_at_ms, kept))

    async def _share(
        self, key: str, entry: Entry, ttl: int, expires_at_ms: int, kept: bool
    ) -> None:
        assert self.remote is not None
        shared = await self.remote.put(key, entry, ttl * 1000, expires_at_ms)
        if shared is False and kept:
            # Redis holds a later change (pushed to another replica first): this replica
            # must not answer from the older one meanwhile.
            self.local.discard_if(key, entry)

    def _below_floor(self, key: str, entry: Entry) -> bool:
        floor = self.floors.get(key.split(":", 1)[0])
        if floor is None or entry.epoch == "":
            return False
        return entry.epoch != floor.epoch or entry.seq < floor.seq

    async def apply(self, key: str, status: CardStatus, position: LogPosition) -> bool:
        """A change the home pushed: a refusal is the answer from now on; ACTIVE only makes
        the next check ask again. Either way it is kept at least as long as the entry it
        replaces (so no answer older than it can come back meanwhile). False when Redis
        failed to take it (the caller must see that Redis is repaired)."""
        refuses = status in (CardStatus.LOST, CardStatus.SUSPENDED, CardStatus.EXPIRED)
        now = self._mono()
        held = self.local.expiry(key)
        least = min(TOMBSTONE_MIN_S, seconds_to_shanghai_midnight(self._wall()))
        ttl = max(least, (held - now) if held is not None else 0)
        rec = Recognition(status, (), int(ttl), position) if refuses else None
        entry = Entry.of(rec, position)
        self.local.put_entry(key, entry, ttl, now)
        if self.remote is not None and least > 0:
            expires_at_ms = int(time.time() * 1000) + int(ttl * 1000)
            done = await self.remote.put(
                key, entry, int(ttl * 1000), expires_at_ms, int(least * 1000)
            )
            return done is not None
        return True

    async def flush(
        self, issuer: str, floor: LogPosition, local: bool = True, keep_floor: bool = True
    ) -> bool:
        """Forget every answer of ``issuer``'s cards (its log was reset or restored, or we
        lost track of it) but those read at ``floor`` itself (unless ``keep_floor`` is
        False: a change after it could not be applied), and from now on cache none read
        before it: first the floor, then the entries, so no answer in flight slips in
        behind the flush. In the in-process tier too unless ``local`` is False. False when
        Redis failed."""
        self.floors[issuer] = floor
        keep = floor if keep_floor else None
        dropped = self.local.drop_prefix(f"{issuer}:", keep=keep) if local else 0
        remote: int | None = 0
        if self.remote is not None:
            remote = None
            if await self.remote.set_floor(issuer, floor):
                remote = await self.remote.drop_prefix(f"{issuer}:", keep=keep)
        log.info("cache_flushed", district=issuer, local=dropped, redis=remote)
        return remote is not None

    async def cursor(self, issuer: str) -> LogPosition | None:
        """The shared cursor in ``issuer``'s status log (Redis), if any: a process that starts
        resumes there, so changes made while the district's processes were away still reach
        the answers they left in Redis."""
        return await self.remote.cursor(issuer) if self.remote is not None else None

    async def save_cursor(self, issuer: str, position: LogPosition) -> None:
        if self.remote is not None:
            await self.remote.save_cursor(issuer, position)

    async def close(self) -> None:
        await self.writes.close()
        if self.remote is not None:
            await self.remote.close()
