"""The shared tier: entries in Redis, read in batches, written by compare-and-set.

Keys are ``yk:v2:<district>:rec:<issuer>:<handle>`` (no card number), with a
PX expiry; per home, a floor key and the district's cursor in its status
log sit beside them. A failure is logged by the tier's :class:`StateLog`
(when it starts, a count a minute, when it ends), never per call.

A frozen Redis would make every call wait out the tier's timeout: behind a
:class:`broker.core.breaker.Breaker`, after three failures in a row calls
fail at once (a read is a miss, a write is not made), and one call every
half second probes whether Redis is back.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from broker.cards.model import CardStatus, Entitlement, LogPosition, Recognition
from broker.core.breaker import Breaker
from broker.core.quiet import StateLog
from broker.gate.entries import Entry

log = structlog.get_logger(__name__)


def encode(entry: Entry, expires_at_ms: int) -> bytes:
    """Compact Redis value: ``status|ent,ent|expires_at_ms|fresh_until_ms|epoch|seq``
    (status ``-``: a tombstone). The Lua compare-and-set reads the last two fields."""
    if entry.rec is None:
        head = "-|"
    else:
        ents = ",".join(str(e.value) for e in entry.rec.entitlements)
        head = f"{entry.rec.status.value}|{ents}"
    tail = f"{expires_at_ms}|{entry.fresh_until_ms}|{entry.epoch}|{entry.seq}"
    return f"{head}|{tail}".encode()


def decode(raw: bytes) -> tuple[Entry, int]:
    """Inverse of :func:`encode`; the answer's TTL is 0: the entry's expiry rules. A value
    of the previous release (no ``fresh_until_ms``) is fresh for as long as it is held."""
    fields = raw.decode().split("|")
    if len(fields) == 5:
        fields.insert(3, "0")
    status, ents, expires, fresh, epoch, seq = fields
    position = LogPosition(epoch, int(seq), "") if epoch else None
    if status == "-":
        return Entry(None, epoch, int(seq), int(fresh)), int(expires)
    entitlements = tuple(Entitlement(int(e)) for e in ents.split(",") if e)
    rec = Recognition(CardStatus(int(status)), entitlements, 0, position)
    return Entry(rec, epoch, int(seq), int(fresh)), int(expires)


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


# KEYS: entries; ARGV[1]: the value ending ("|epoch|seq") of those to keep. Unlinks the rest.
_DROP = """
local gone = 0
local keep = ARGV[1]
for _, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  if v and string.sub(v, -string.len(keep)) ~= keep then
    redis.call('UNLINK', key)
    gone = gone + 1
  end
end
return gone
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
        self._drop = client.register_script(_DROP)
        # One line when Redis starts failing, a count a minute while it does, one when it
        # is back: never a line per call (a gate check may touch it twice).
        self.state = StateLog(log, "redis", district=district)
        self.breaker = Breaker()

    def _refused(self) -> bool:
        """Whether the breaker refuses a call now (it then fails at once, without waiting)."""
        return not self.breaker.allow()

    def _failed(self, exc: BaseException) -> None:
        self.state.failed(type(exc).__name__)
        self.breaker.failed()

    def _ok(self) -> None:
        self.state.ok()
        self.breaker.succeeded()

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
        if self._refused():
            return None
        try:
            async with asyncio.timeout(self._timeout):
                raw = await self._batcher.get(self.redis_key(key))
        except (RedisError, TimeoutError, OSError) as exc:
            self._failed(exc)
            return None
        self._ok()
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
        if self._refused():
            return None
        value = encode(entry, expires_at_ms)
        try:
            async with asyncio.timeout(self._timeout):
                done = await self._cas(
                    keys=[self.redis_key(key), self._floor_key(key.split(":", 1)[0])],
                    args=[value, ttl_ms, entry.epoch, entry.seq, least_ms],
                )
        except (RedisError, TimeoutError, OSError) as exc:
            self._failed(exc)
            return None
        self._ok()
        return bool(done)

    async def set_floor(self, issuer: str, position: LogPosition) -> bool:
        """No entry of ``issuer``'s below ``position`` (or of another epoch) is written from
        now on (see ``_CAS``); whether Redis took it."""
        if self._refused():
            return False
        try:
            async with asyncio.timeout(self._timeout):
                await self._client.set(self._floor_key(issuer), f"{position.epoch}|{position.seq}")
        except (RedisError, TimeoutError, OSError) as exc:
            self._failed(exc)
            return False
        self._ok()
        return True

    def _floor_key(self, issuer: str) -> str:
        return self._prefix.replace(":rec:", ":floor:") + issuer

    async def drop_prefix(self, prefix: str, keep: LogPosition | None = None) -> int | None:
        """Delete every entry whose key starts with ``prefix`` but those read at exactly
        ``keep``: how many, ``None`` when Redis failed (SCAN, then a script per batch)."""
        gone = 0
        tail = f"|{keep.epoch}|{keep.seq}" if keep is not None else "\n"  # "\n": no value ends so
        if self._refused():
            return None
        try:
            batch: list[str | bytes] = []
            async for k in self._client.scan_iter(match=self.redis_key(prefix) + "*", count=1000):
                batch.append(k)
                if len(batch) >= 1000:
                    gone += int(await self._drop(keys=batch, args=[tail]))
                    batch = []
            if batch:
                gone += int(await self._drop(keys=batch, args=[tail]))
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return None
        self._ok()
        return gone

    async def cursor(self, issuer: str) -> LogPosition | None:
        """Where this district's processes last were in ``issuer``'s status log (``None``:
        nowhere yet); :class:`TierFailed` when Redis cannot say."""
        if self._refused():
            raise TierFailed("breaker open")
        try:
            async with asyncio.timeout(self._timeout):
                raw = await self._client.get(self._cursor_key(issuer))
        except (RedisError, TimeoutError, OSError) as exc:
            self._failed(exc)
            raise TierFailed(type(exc).__name__) from exc
        self._ok()
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
        if self._refused():
            return
        try:
            async with asyncio.timeout(self._timeout):
                await self._client.set(self._cursor_key(issuer), value)
        except (RedisError, TimeoutError, OSError) as exc:
            self._failed(exc)
            return
        self._ok()

    def _cursor_key(self, issuer: str) -> str:
        return self._prefix.replace(":rec:", ":cursor:") + issuer

    async def close(self) -> None:
        await self._client.aclose()
