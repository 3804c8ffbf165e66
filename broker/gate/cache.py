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
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from broker.cards.model import (
    CardStatus,
    Entitlement,
    LogPosition,
    Recognition,
    seconds_to_shanghai_midnight,
)
from broker.core.quiet import StateLog
from broker.gate.config import CacheConfig

log = structlog.get_logger(__name__)

# A pushed change is kept at least this long, though no answer about the card is cached:
# an answer in flight when it arrived must still find it (and lose to it). A peer call
# may take up to 60 s ([peering] deadline_ms at its largest), plus clock skew.
TOMBSTONE_MIN_S = 65
# How long an answer of a home whose changes are not being followed now is kept (the
# stream is down, refused, or not yet open): what a lost card may still be let in for.
UNFOLLOWED_TTL_S = 10
_NO_SEQ = -1


@dataclass(frozen=True, slots=True)
class Entry:
    """What a tier holds for a card: the answer, or ``None`` for "ask again" (a tombstone);
    and the home's log position it is as of (``epoch`` "" : an answer without one)."""

    rec: Recognition | None
    epoch: str = ""
    seq: int = _NO_SEQ

    @classmethod
    def of(cls, rec: Recognition | None, position: LogPosition | None) -> Entry:
        if position is None:
            return cls(rec)
        return cls(rec, position.epoch, position.seq)


def may_replace(new: Entry, old: Entry | None) -> bool:
    """Whether ``new`` may take the place of ``old`` (see the module docstring).

    Positions of one epoch order the writes; an entry with a position is never replaced by
    one without (a home that stopped sending them cannot undo a pushed change); across
    epochs (the home's log was reset) the later write wins.
    """
    if old is None:
        return True
    if new.epoch == "":
        return old.epoch == ""
    if new.epoch != old.epoch:
        return True
    return new.seq >= old.seq


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

    def drop_prefix(self, prefix: str) -> int:
        """Forget every entry whose key starts with ``prefix`` (one district's); how many."""
        gone = [k for k in self._entries if k.startswith(prefix)]
        for k in gone:
            del self._entries[k]
        return len(gone)


def encode(entry: Entry, expires_at_ms: int) -> bytes:
    """Compact Redis value: ``status|ent,ent|expires_at_ms|epoch|seq`` (status ``-``: a
    tombstone). The Lua compare-and-set reads the last two fields."""
    if entry.rec is None:
        head = "-|"
    else:
        ents = ",".join(str(e.value) for e in entry.rec.entitlements)
        head = f"{entry.rec.status.value}|{ents}"
    return f"{head}|{expires_at_ms}|{entry.epoch}|{entry.seq}".encode()


def decode(raw: bytes) -> tuple[Entry, int]:
    """Inverse of :func:`encode`; the answer's TTL is 0: the entry's expiry rules."""
    status, ents, expires, epoch, seq = raw.decode().split("|")
    position = LogPosition(epoch, int(seq), "") if epoch else None
    if status == "-":
        return Entry(None, epoch, int(seq)), int(expires)
    entitlements = tuple(Entitlement(int(e)) for e in ents.split(",") if e)
    rec = Recognition(CardStatus(int(status)), entitlements, 0, position)
    return Entry(rec, epoch, int(seq)), int(expires)


# KEYS[1]: the entry, KEYS[2]: its home's floor; ARGV: value, px, epoch, seq, min px.
# Written unless the entry held has a later position of the same epoch, or has one when
# the new has none (see may_replace), or the new one's position is below the home's floor
# (another epoch, or before the position a flush of that home's answers was made at).
# With a min px (a tombstone), the entry keeps the longer of its life and that.
_CAS = """
local floor = redis.call('GET', KEYS[2])
if floor and ARGV[3] ~= '' then
  local fe, fs = string.match(floor, '^([^|]*)|(%d+)$')
  if fe and (fe ~= ARGV[3] or tonumber(ARGV[4]) < tonumber(fs)) then return 0 end
end
local cur = redis.call('GET', KEYS[1])
if cur then
  local e, s = string.match(cur, '|([^|]*)|(-?%d+)$')
  if e then
    if ARGV[3] == '' and e ~= '' then return 0 end
    if ARGV[3] ~= '' and e == ARGV[3] and tonumber(s) > tonumber(ARGV[4]) then return 0 end
  end
end
local px = tonumber(ARGV[2])
local least = tonumber(ARGV[5])
if least > 0 then
  local left = redis.call('PTTL', KEYS[1])
  px = math.max(least, left)
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', px)
return 1
"""


class TierFailed(Exception):
    """Redis could not answer (its failure is logged by the tier's StateLog)."""


class GetBatcher:
    """Coalesces the GETs issued in one turn of the event loop into a single MGET.

    Under load a node receives many checks per loop turn; one round trip for
    all of them costs far less than one per check (redis-py's per-command
    overhead dominates a loopback GET). A lone GET still goes out on the
    very next turn.
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._pending: dict[str, list[asyncio.Future[bytes | None]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def get(self, key: str) -> asyncio.Future[bytes | None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes | None] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.setdefault(key, []).append(fut)
        return fut

    def _flush(self) -> None:
        batch, self._pending = self._pending, {}
        task = asyncio.ensure_future(self._fetch(batch))
        self._tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(self._tasks.discard)

    async def _fetch(self, batch: dict[str, list[asyncio.Future[bytes | None]]]) -> None:
        keys = list(batch)
        try:
            values = await self._client.mget(keys)
        except Exception as exc:
            for futs in batch.values():
                for fut in futs:
                    if not fut.done():  # a waiter that timed out is already done
                        fut.set_exception(exc)
            return
        for key, value in zip(keys, values, strict=True):
            raw = value.encode() if isinstance(value, str) else value
            for fut in batch[key]:
                if not fut.done():
                    fut.set_result(raw)


class RedisTier:
    """Entries in Redis under ``yk:v2:<district>:rec:<issuer>:<card key>``, with a PX expiry."""

    def __init__(self, client: aioredis.Redis, district: str, timeout_s: float) -> None:
        self._client = client
        self._batcher = GetBatcher(client)
        self._prefix = f"yk:v2:{district}:rec:"
        self._timeout = timeout_s
        self._cas = client.register_script(_CAS)
        # One line when Redis starts failing, a count a minute while it does, one when it
        # is back: never a line per call (a gate check may touch it twice).
        self.state = StateLog(log, "redis", district=district)

    def redis_key(self, key: str) -> str:
        return self._prefix + key

    async def reachable(self) -> bool:
        """Whether Redis answers a PING within the tier's timeout (a health check)."""
        try:
            async with asyncio.timeout(self._timeout):
                return bool(await self._client.ping())
        except (RedisError, TimeoutError, OSError):
            return False

    async def get(self, key: str) -> tuple[Entry, int] | None:
        """``(entry, expires_at_ms)`` or ``None`` on a miss or a Redis failure."""
        try:
            async with asyncio.timeout(self._timeout):
                raw = await self._batcher.get(self.redis_key(key))
        except (RedisError, TimeoutError, OSError) as exc:
            self.state.failed(type(exc).__name__)
            return None
        self.state.ok()
        if raw is None:
            return None
        try:
            return decode(raw)
        except ValueError:
            log.warning("redis_value_malformed")
            return None

    async def put(
        self, key: str, entry: Entry, ttl_ms: int, expires_at_ms: int, least_ms: int = 0
    ) -> bool | None:
        """Compare-and-set (see ``_CAS``): whether written; ``None`` when Redis failed."""
        value = encode(entry, expires_at_ms)
        try:
            async with asyncio.timeout(self._timeout):
                done = await self._cas(
                    keys=[self.redis_key(key), self._floor_key(key.split(":", 1)[0])],
                    args=[value, ttl_ms, entry.epoch, entry.seq, least_ms],
                )
        except (RedisError, TimeoutError, OSError) as exc:
            self.state.failed(type(exc).__name__)
            return None
        self.state.ok()
        return bool(done)

    async def set_floor(self, issuer: str, position: LogPosition) -> bool:
        """No entry of ``issuer``'s below ``position`` (or of another epoch) is written from
        now on (see ``_CAS``); whether Redis took it."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._client.set(self._floor_key(issuer), f"{position.epoch}|{position.seq}")
        except (RedisError, TimeoutError, OSError) as exc:
            self.state.failed(type(exc).__name__)
            return False
        return True

    def _floor_key(self, issuer: str) -> str:
        return self._prefix.replace(":rec:", ":floor:") + issuer

    async def drop_prefix(self, prefix: str) -> int | None:
        """Delete every entry whose key starts with ``prefix``: how many, ``None`` when Redis
        failed (SCAN, UNLINK)."""
        gone = 0
        try:
            batch: list[str | bytes] = []
            async for k in self._client.scan_iter(match=self.redis_key(prefix) + "*", count=1000):
                batch.append(k)
                if len(batch) >= 1000:
                    gone += int(await self._client.unlink(*batch))
                    batch = []
            if batch:
                gone += int(await self._client.unlink(*batch))
        except (RedisError, OSError) as exc:
            self.state.failed(type(exc).__name__)
            return None
        return gone

    async def cursor(self, issuer: str) -> LogPosition | None:
        """Where this district's processes last were in ``issuer``'s status log (``None``:
        nowhere yet); :class:`TierFailed` when Redis cannot say."""
        try:
            async with asyncio.timeout(self._timeout):
                raw = await self._client.get(self._cursor_key(issuer))
        except (RedisError, TimeoutError, OSError) as exc:
            self.state.failed(type(exc).__name__)
            raise TierFailed(type(exc).__name__) from exc
        if raw is None:
            return None
        try:
            epoch, seq, mark = (raw.decode() if isinstance(raw, bytes) else raw).split("|")
            return LogPosition(epoch, int(seq), mark)
        except ValueError:
            return None

    async def save_cursor(self, issuer: str, position: LogPosition) -> None:
        """Best effort: a cursor left behind only makes a process that starts re-apply."""
        value = f"{position.epoch}|{position.seq}|{position.mark}"
        try:
            async with asyncio.timeout(self._timeout):
                await self._client.set(self._cursor_key(issuer), value)
        except (RedisError, TimeoutError, OSError) as exc:
            self.state.failed(type(exc).__name__)

    def _cursor_key(self, issuer: str) -> str:
        return self._prefix.replace(":rec:", ":cursor:") + issuer

    async def close(self) -> None:
        await self._client.aclose()


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

    def get_local(self, key: str) -> Recognition | None:
        """The in-process tier alone: no await, for the hot path."""
        return self.local.get(key, time.monotonic())

    async def get(self, key: str) -> Recognition | None:
        """Local tier, then Redis (filling the local tier for the time Redis has left).

        A tombstone here (a pushed change) also stands against Redis: an entry there
        older than it (its write lost the race, or failed) is a miss.
        """
        held = self.local.entry(key, time.monotonic())
        if held is not None and held.rec is not None:
            return held.rec
        if self.remote is None:
            return None
        found = await self.remote.get(key)
        if found is None:
            return None
        entry, expires_at_ms = found
        if held is not None and not may_replace(entry, held):
            return None
        if self._below_floor(key, entry):
            return None
        left = expires_at_ms / 1000 - time.time()
        if left <= 0:
            return None
        self.local.put_entry(key, entry, left, time.monotonic())
        return entry.rec

    async def put(self, key: str, rec: Recognition) -> None:
        """Cache a home's answer, unless either tier holds a later position."""
        ttl = self.ttl_for(rec)
        if rec.position is not None and key.split(":", 1)[0] not in self.following:
            ttl = min(ttl, UNFOLLOWED_TTL_S)
        if ttl <= 0:
            return
        entry = Entry.of(rec, rec.position)
        if self._below_floor(key, entry):
            return  # read before this home's answers were dropped: it may miss a change
        kept = self.local.put_entry(key, entry, ttl, time.monotonic())
        if self.remote is not None:
            expires_at_ms = int(time.time() * 1000) + ttl * 1000
            shared = await self.remote.put(key, entry, ttl * 1000, expires_at_ms)
            if shared is False and kept:
                # Redis holds a later change (pushed to another replica first): this
                # replica must not answer from the older one meanwhile.
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
        now = time.monotonic()
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

    async def flush(self, issuer: str, floor: LogPosition, local: bool = True) -> bool:
        """Forget every answer of ``issuer``'s cards (its log was reset or restored, or we
        lost track of it), and from now on cache none read before ``floor``: first the
        floor, then the entries, so no answer in flight slips in behind the flush. In the
        in-process tier too unless ``local`` is False. False when Redis failed."""
        self.floors[issuer] = floor
        dropped = self.local.drop_prefix(f"{issuer}:") if local else 0
        remote: int | None = 0
        if self.remote is not None:
            remote = None
            if await self.remote.set_floor(issuer, floor):
                remote = await self.remote.drop_prefix(f"{issuer}:")
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
        if self.remote is not None:
            await self.remote.close()
