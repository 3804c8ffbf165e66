"""Caching peer districts' answers: a bounded in-process tier in front of Redis.

Keys are keyed hashes of (issuer_region, card_number) — see
:mod:`broker.cards.privacy` — so neither tier ever holds a raw card number. The
Redis tier is shared by every replica of a district; the in-process tier
keeps each replica's hot cards a dictionary lookup away. An entry expires at
the same instant in both tiers: a replica that fills its local tier from
Redis keeps the entry only for the time Redis has left.

Redis failures never fail a gate check: a slow or broken Redis counts as a
miss (and is logged), and the node carries on asking peers.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from broker.cards.model import CardStatus, Entitlement, Recognition
from broker.gate.config import CacheConfig

log = structlog.get_logger(__name__)


class LocalTier:
    """Bounded LRU of answers with per-entry expiry on the monotonic clock."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, Recognition]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now: float) -> Recognition | None:
        item = self._entries.get(key)
        if item is None:
            return None
        expires, rec = item
        if now >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return rec

    def put(self, key: str, rec: Recognition, ttl: float, now: float) -> None:
        if self.max_entries <= 0 or ttl <= 0:
            return
        self._entries[key] = (now + ttl, rec)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def discard(self, key: str) -> None:
        self._entries.pop(key, None)


def encode(rec: Recognition, expires_at_ms: int) -> bytes:
    """Compact Redis value: ``status|ent,ent|expires_at_ms``."""
    ents = ",".join(str(e.value) for e in rec.entitlements)
    return f"{rec.status.value}|{ents}|{expires_at_ms}".encode()


def decode(raw: bytes) -> tuple[Recognition, int]:
    """Inverse of :func:`encode`; the answer's TTL is 0: the entry's expiry rules."""
    status, ents, expires = raw.decode().split("|")
    entitlements = tuple(Entitlement(int(e)) for e in ents.split(",") if e)
    return Recognition(CardStatus(int(status)), entitlements, 0), int(expires)


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
    """Answers in Redis under ``yk:v1:<district>:rec:<card key>``, with a PX expiry."""

    def __init__(self, client: aioredis.Redis, district: str, timeout_s: float) -> None:
        self._client = client
        self._batcher = GetBatcher(client)
        self._prefix = f"yk:v1:{district}:rec:"
        self._timeout = timeout_s

    def redis_key(self, key: str) -> str:
        return self._prefix + key

    async def reachable(self) -> bool:
        """Whether Redis answers a PING within the tier's timeout (a health check)."""
        try:
            async with asyncio.timeout(self._timeout):
                return bool(await self._client.ping())
        except (RedisError, TimeoutError, OSError):
            return False

    async def get(self, key: str) -> tuple[Recognition, int] | None:
        """``(answer, expires_at_ms)`` or ``None`` on a miss or a Redis failure."""
        try:
            async with asyncio.timeout(self._timeout):
                raw = await self._batcher.get(self.redis_key(key))
        except (RedisError, TimeoutError, OSError) as exc:
            log.warning("redis_get_failed", error=type(exc).__name__)
            return None
        if raw is None:
            return None
        try:
            return decode(raw)
        except ValueError:
            log.warning("redis_value_malformed")
            return None

    async def put(self, key: str, rec: Recognition, ttl_ms: int, expires_at_ms: int) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._client.set(self.redis_key(key), encode(rec, expires_at_ms), px=ttl_ms)
        except (RedisError, TimeoutError, OSError) as exc:
            log.warning("redis_set_failed", error=type(exc).__name__)

    async def close(self) -> None:
        await self._client.aclose()


class AnswerCache:
    """The two tiers together. Callers see one ``get`` and one ``put``."""

    def __init__(self, cfg: CacheConfig, remote: RedisTier | None) -> None:
        self._cfg = cfg
        self.local = LocalTier(cfg.local_max_entries)
        self.remote = remote

    @classmethod
    def from_config(cls, cfg: CacheConfig, district: str) -> AnswerCache:
        remote = None
        if cfg.redis_url:
            timeout = cfg.redis_timeout_ms / 1000
            client = aioredis.Redis.from_url(
                cfg.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout
            )
            remote = RedisTier(client, district, timeout)
        return cls(cfg, remote)

    def ttl_for(self, rec: Recognition) -> int:
        """Seconds to keep an answer: the home district's TTL, bounded by ours."""
        ttl = min(rec.ttl_seconds, self._cfg.max_ttl_seconds)
        if rec.status is CardStatus.UNKNOWN:
            ttl = min(ttl, self._cfg.unknown_ttl_seconds)
        return max(ttl, 0)

    def get_local(self, key: str) -> Recognition | None:
        """The in-process tier alone: no await, for the hot path."""
        return self.local.get(key, time.monotonic())

    async def get(self, key: str) -> Recognition | None:
        """Local tier, then Redis (filling the local tier for the time Redis has left)."""
        rec = self.get_local(key)
        if rec is not None or self.remote is None:
            return rec
        found = await self.remote.get(key)
        if found is None:
            return None
        rec, expires_at_ms = found
        left = expires_at_ms / 1000 - time.time()
        if left <= 0:
            return None
        self.local.put(key, rec, left, time.monotonic())
        return rec

    async def put(self, key: str, rec: Recognition) -> None:
        ttl = self.ttl_for(rec)
        if ttl <= 0:
            return
        self.local.put(key, rec, ttl, time.monotonic())
        if self.remote is not None:
            expires_at_ms = int(time.time() * 1000) + ttl * 1000
            await self.remote.put(key, rec, ttl * 1000, expires_at_ms)

    async def close(self) -> None:
        if self.remote is not None:
            await self.remote.close()
