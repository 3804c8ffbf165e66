"""The answer cache: bounded in-process tier, shared Redis tier, keyed-hash keys."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime

import pytest
import redis
from structlog.testing import capture_logs

from broker.cards.model import CardRef, CardStatus, Entitlement, LogPosition, Recognition, Scene
from broker.cards.privacy import Hasher
from broker.gate import cache as cache_module
from broker.gate.cache import AnswerCache, LocalTier, WriteBehind
from broker.gate.config import CacheConfig
from broker.gate.entries import Entry
from broker.gate.redis_tier import decode, encode

HASHER = Hasher(b"s" * 32)


def NOON() -> datetime:
    """Noon in Shanghai: far from the midnight every entry ends by."""
    return datetime(2026, 3, 1, 4, 0, tzinfo=UTC)


REF = CardRef("512021", "C5120210000001")
ACTIVE = Recognition(CardStatus.ACTIVE, (Entitlement.SENIOR_60, Entitlement.DISABLED), 120)
UNKNOWN = Recognition(CardStatus.UNKNOWN, (), 600)


def test_local_tier_is_bounded_lru_with_expiry():
    tier = LocalTier(max_entries=2)
    tier.put("a", ACTIVE, ttl=10, now=0)
    tier.put("b", ACTIVE, ttl=10, now=0)
    assert tier.get("a", now=1) == ACTIVE  # a is now most recent
    tier.put("c", ACTIVE, ttl=10, now=1)
    assert len(tier) == 2
    assert tier.get("b", now=1) is None  # least recently used went
    assert tier.get("a", now=10.5) is None  # expired
    assert tier.get("c", now=10.9) == ACTIVE


def key_of(ref: CardRef) -> str:
    return f"{ref.issuer_region}:{HASHER.card_key(ref)}"


def at(seq: int, epoch: str = "e1") -> LogPosition:
    return LogPosition(epoch, seq, "m" if seq else "")


async def test_unknown_answers_are_cached_only_briefly():
    cache = AnswerCache(CacheConfig(unknown_ttl_seconds=7, max_ttl_seconds=100), None, NOON)
    assert cache.ttl_for(UNKNOWN) == 7
    assert cache.ttl_for(Recognition(CardStatus.ACTIVE, (), 60)) == 60
    assert cache.ttl_for(Recognition(CardStatus.ACTIVE, (), 5000)) == 100


def test_local_tier_keeps_a_pushed_change_against_an_older_answer():
    tier = LocalTier(max_entries=10)
    assert tier.put_entry("k", Entry(None, "e1", 6), ttl=30, now=0)  # ACTIVE pushed: ask again
    assert tier.get("k", now=1) is None  # a tombstone reads as a miss
    assert not tier.put("k", replace(ACTIVE, position=at(5)), ttl=10, now=1)
    assert tier.get("k", now=1) is None
    assert tier.put("k", replace(ACTIVE, position=at(6)), ttl=10, now=1)
    assert tier.get("k", now=1) == replace(ACTIVE, position=at(6))
    assert tier.drop_prefix("k") == 1 and len(tier) == 0


async def test_in_process_only_when_no_redis_is_configured():
    cache = AnswerCache.from_config(CacheConfig(redis_url=None), "500111", wall=NOON)
    key = key_of(REF)
    await cache.put(key, ACTIVE)
    await cache.writes.settled()
    assert cache.remote is None
    assert await cache.get(key) == ACTIVE


async def test_replicas_share_answers_through_redis_under_hashed_keys(redis_db: str):
    cfg = CacheConfig(redis_url=redis_db, unknown_ttl_seconds=3)
    replica_a = AnswerCache.from_config(cfg, "500111", wall=NOON)
    replica_b = AnswerCache.from_config(cfg, "500111", wall=NOON)
    key = key_of(REF)
    try:
        await replica_a.put(key, ACTIVE)
        await replica_a.writes.settled()
        assert replica_b.get_local(key) is None
        got = await replica_b.get(key)
        assert got is not None and got.status is CardStatus.ACTIVE
        assert got.entitlements == ACTIVE.entitlements
        assert replica_b.get_local(key) is not None  # filled from Redis
        other = key_of(CardRef("512021", "C5120210000002"))
        await replica_a.put(other, UNKNOWN)
        await replica_a.writes.settled()
        client = redis.Redis.from_url(redis_db)
        keys = [k.decode() for k in client.scan_iter("yk:v2:500111:*")]
        assert sorted(keys) == sorted([f"yk:v2:500111:rec:{key}", f"yk:v2:500111:rec:{other}"])
        assert all(REF.card_number not in k for k in keys)
        assert all(REF.card_number.encode() not in (client.get(k) or b"") for k in keys)
        assert 0 < client.pttl(f"yk:v2:500111:rec:{other}") <= 3000
        assert client.pttl(f"yk:v2:500111:rec:{key}") <= 120_000
        client.close()
    finally:
        await replica_a.close()
        await replica_b.close()


async def test_a_dead_redis_is_a_miss_not_a_failure():
    cfg = CacheConfig(redis_url="redis://127.0.0.1:1/0", redis_timeout_ms=50, local_max_entries=0)
    cache = AnswerCache.from_config(cfg, "500111", wall=NOON)
    key = key_of(REF)
    try:
        with capture_logs() as events:
            await cache.put(key, ACTIVE)
            await cache.writes.settled()
            assert await cache.get(key) is None
            for _ in range(50):
                assert await cache.get(key) is None
        # one line for 52 failed calls: logged when it began failing, not per call
        assert [e["event"] for e in events] == ["redis_failing"]
    finally:
        await cache.close()


async def test_a_late_answer_never_undoes_a_pushed_change_at_any_replica(redis_db: str):
    """LOST pushed at position 8; an ACTIVE answer read at 7 arrives after it, at another
    replica: Redis's compare-and-set refuses it, and both replicas refuse the card."""
    cfg = CacheConfig(redis_url=redis_db)
    pushed, late = (
        AnswerCache.from_config(cfg, "500111", wall=NOON),
        AnswerCache.from_config(cfg, "500111", wall=NOON),
    )
    key = key_of(REF)
    try:
        await pushed.apply(key, CardStatus.LOST, at(8))
        await late.put(key, replace(ACTIVE, position=at(7)))
        await late.writes.settled()
        for replica in (pushed, late):
            got = await replica.get(key)
            assert got is not None and got.status is CardStatus.LOST
        fresh = AnswerCache.from_config(replace(cfg, local_max_entries=0), "500111", wall=NOON)
        try:
            got = await fresh.get(key)  # Redis alone
            assert got is not None and got.status is CardStatus.LOST
        finally:
            await fresh.close()
        await late.put(key, replace(ACTIVE, position=at(9)))  # read after a reactivation
        got = await pushed.get(key)
        assert got is not None and got.status is CardStatus.LOST  # its local tier: its own
        fresh = AnswerCache.from_config(replace(cfg, local_max_entries=0), "500111", wall=NOON)
        try:
            got = await fresh.get(key)
            assert got is not None and got.status is CardStatus.ACTIVE
        finally:
            await fresh.close()
    finally:
        await pushed.close()
        await late.close()


async def test_a_pushed_active_only_invalidates_and_keeps_older_answers_out(redis_db: str):
    cfg = CacheConfig(redis_url=redis_db)
    cache = AnswerCache.from_config(cfg, "500111", wall=NOON)
    key = key_of(REF)
    client = redis.Redis.from_url(redis_db)
    try:
        await cache.put(key, replace(ACTIVE, position=at(3)))
        await cache.writes.settled()
        await cache.apply(key, CardStatus.ACTIVE, at(4))  # e.g. a flag changed at home
        assert await cache.get(key) is None  # ask the home again
        assert client.pttl(f"yk:v2:500111:rec:{key}") > 30_000  # kept as long as the answer
        await cache.put(key, replace(ACTIVE, position=at(3)))  # a slow answer from before
        assert await cache.get(key) is None
        await cache.put(key, replace(ACTIVE, position=at(4)))
        await cache.writes.settled()
        assert await cache.get(key) == replace(ACTIVE, position=at(4))
    finally:
        client.close()
        await cache.close()


async def test_a_flush_forgets_one_districts_answers_in_both_tiers(redis_db: str):
    cfg = CacheConfig(redis_url=redis_db)
    cache = AnswerCache.from_config(cfg, "500111", wall=NOON)
    anyue, tongnan = key_of(REF), key_of(CardRef("500223", "C5002230000001"))
    try:
        await cache.put(anyue, ACTIVE)
        await cache.writes.settled()
        await cache.put(tongnan, ACTIVE)
        await cache.writes.settled()
        assert await cache.flush("512021", at(7))
        assert cache.get_local(anyue) is None and cache.get_local(tongnan) == ACTIVE
        other = AnswerCache.from_config(replace(cfg, local_max_entries=0), "500111", wall=NOON)
        try:
            assert await other.get(anyue) is None
            assert await other.get(tongnan) is not None
        finally:
            await other.close()
    finally:
        await cache.close()


async def test_no_entry_outlives_midnight_in_shanghai():
    def late() -> datetime:
        return datetime(2026, 3, 1, 15, 59, 0, tzinfo=UTC)  # 23:59 in Shanghai

    cache = AnswerCache(CacheConfig(max_ttl_seconds=3600), None, late)
    assert cache.ttl_for(ACTIVE) == 60  # not 120: the day ends in a minute


async def test_a_local_tombstone_stands_against_an_older_entry_in_redis(redis_db: str):
    """A pushed change applied here whose Redis write failed (or lost a race): the older
    answer still in Redis is a miss for this process, not an answer."""
    cfg = CacheConfig(redis_url=redis_db)
    here = AnswerCache.from_config(cfg, "500111", wall=NOON)
    other = AnswerCache.from_config(cfg, "500111", wall=NOON)
    key = key_of(REF)
    try:
        await other.put(key, replace(ACTIVE, position=at(3)))
        await other.writes.settled()
        here.local.put_entry(key, Entry(None, "e1", 4), ttl=60, now=time.monotonic())
        assert await here.get(key) is None
        await other.put(key, replace(ACTIVE, position=at(5)))  # read after the change
        got = await here.get(key)
        assert got is not None and got.status is CardStatus.ACTIVE
        assert got.position is not None and got.position.seq == 5
    finally:
        await here.close()
        await other.close()


async def test_after_a_flush_no_answer_read_before_its_floor_is_cached_by_anyone(redis_db: str):
    """The watcher of one process dropped Anyue's answers at position 10 (its cursor could
    not go on): an answer read before that, still in flight here or in another process,
    may miss a change, so neither tier keeps it; one read since, or of an old home that
    sends no position, is kept."""
    cfg = CacheConfig(redis_url=redis_db)
    here = AnswerCache.from_config(cfg, "500111", wall=NOON)
    other = AnswerCache.from_config(cfg, "500111", wall=NOON)  # no floor of its own
    redis_only = AnswerCache.from_config(replace(cfg, local_max_entries=0), "500111", wall=NOON)
    key = key_of(REF)
    try:
        assert await here.flush("512021", at(10))
        for stale in (at(9), LogPosition("e0", 99, "m")):  # before the floor; an old epoch
            await here.put(key, replace(ACTIVE, position=stale))
            await here.writes.settled()
            assert here.get_local(key) is None
            await other.put(key, replace(ACTIVE, position=stale))
            await other.writes.settled()
            assert await redis_only.get(key) is None  # Redis refused it (the floor)
        await other.put(key, replace(ACTIVE, position=at(10)))
        await other.writes.settled()
        assert (await redis_only.get(key)) is not None
        tongnan = key_of(CardRef("500223", "C5002230000001"))
        await here.put(tongnan, replace(ACTIVE, position=at(1)))  # another home: no floor
        assert here.get_local(tongnan) is not None
    finally:
        for c in (here, other, redis_only):
            await c.close()


async def test_an_answer_no_push_could_reach_is_kept_only_briefly(redis_db: str):
    """While this process is not following Anyue's changes (its stream down or refused), an
    answer that a push could have corrected is kept 10 s, not its 120 s; an answer of a home
    that sends no position (an older release, which pushes nothing) is kept as long as ever."""
    cfg = CacheConfig(redis_url=redis_db)
    cache = AnswerCache.from_config(cfg, "500111", wall=NOON)
    client = redis.Redis.from_url(redis_db)
    key, old_home = key_of(REF), key_of(CardRef("500223", "C5002230000001"))
    try:
        await cache.put(key, replace(ACTIVE, position=at(3)))
        await cache.writes.settled()
        assert 0 < client.pttl(f"yk:v2:500111:rec:{key}") <= 10_000
        await cache.put(old_home, ACTIVE)
        await cache.writes.settled()
        assert client.pttl(f"yk:v2:500111:rec:{old_home}") > 100_000
        cache.following.add("512021")
        await cache.put(key, replace(ACTIVE, position=at(3)))
        await cache.writes.settled()
        assert client.pttl(f"yk:v2:500111:rec:{key}") > 100_000
    finally:
        client.close()
        await cache.close()


async def test_a_flush_keeps_what_was_read_at_its_floor_itself(redis_db: str):
    """A process that starts asks its peer's log from nowhere and is told to go on from the
    head: answers it cached meanwhile, read at that very head, cannot have missed anything
    and are kept (in both tiers); any other of that home's is dropped."""
    cfg = CacheConfig(redis_url=redis_db)
    cache = AnswerCache.from_config(cfg, "500111", wall=NOON)
    redis_only = AnswerCache.from_config(replace(cfg, local_max_entries=0), "500111", wall=NOON)
    cache.following.add("512021")
    at_head, older = key_of(REF), key_of(CardRef("512021", "C5120210000009"))
    try:
        await cache.put(at_head, replace(ACTIVE, position=at(10)))
        await cache.writes.settled()
        await cache.put(older, replace(ACTIVE, position=at(9)))
        await cache.writes.settled()
        assert await cache.flush("512021", at(10))
        assert cache.get_local(at_head) is not None and cache.get_local(older) is None
        assert await redis_only.get(at_head) is not None
        assert await redis_only.get(older) is None
        assert await cache.flush("512021", LogPosition("e2", 0, ""))  # a reset log: all go
        assert cache.get_local(at_head) is None and await redis_only.get(at_head) is None
    finally:
        await cache.close()
        await redis_only.close()


async def test_writes_behind_the_request_are_bounded_and_a_full_queue_drops_the_newest():
    writes = WriteBehind(limit=2)
    gate = asyncio.Event()
    done: list[int] = []

    def job(i: int) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            await gate.wait()
            done.append(i)

        return run

    for i in range(5):
        writes.submit(job(i))
    assert (len(writes), writes.dropped) == (2, 3)  # the newest three found it full
    await asyncio.sleep(0)  # the drain takes the first and waits on it
    assert len(writes) == 1
    writes.submit(job(5))  # room again
    gate.set()
    await asyncio.wait_for(writes.settled(), 5)
    assert done == [0, 1, 5]
    await writes.close()


async def test_a_write_that_fails_does_not_stop_the_ones_after_it():
    writes = WriteBehind()
    done: list[str] = []

    async def fails() -> None:
        raise ConnectionError("redis went away")

    async def works() -> None:
        done.append("after")

    writes.submit(fails)
    writes.submit(works)
    await asyncio.wait_for(writes.settled(), 5)
    assert done == ["after"]
    await writes.close()


# ---------------------------------------------------------------- stale while revalidate


class Later:
    """The clocks a cache judges freshness and expiry by, moved on together by a test."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cache: AnswerCache) -> None:
        self.offset_ms = 0
        real = cache_module._now_ms
        monkeypatch.setattr(cache_module, "_now_ms", lambda: real() + self.offset_ms)
        monkeypatch.setattr(cache, "_mono", lambda: time.monotonic() + self.offset_ms / 1000)


STALE_OK = replace(ACTIVE, ttl_seconds=60, position=at(3), max_stale_seconds=300)


async def test_past_its_ttl_an_answer_is_stale_within_both_limits_then_gone(
    monkeypatch: pytest.MonkeyPatch,
):
    cache = AnswerCache(CacheConfig(max_stale_seconds={"bus": 120, "museum": 900}), None, NOON)
    cache.following.add("512021")
    clock = Later(monkeypatch, cache)
    key = key_of(REF)
    await cache.put(key, STALE_OK)
    assert await cache.lookup(key, 120) == (STALE_OK, False) and cache.get_local(key) == STALE_OK
    clock.offset_ms = 61_000  # past the TTL
    assert cache.get_local(key) is None and await cache.get(key) is None  # not fresh
    assert await cache.lookup(key, cache.stale_limit(Scene.BUS)) == (STALE_OK, True)
    clock.offset_ms = 60_000 + 121_000  # past the bus's limit, within the home's
    assert await cache.lookup(key, cache.stale_limit(Scene.BUS)) is None
    assert await cache.lookup(key, cache.stale_limit(Scene.MUSEUM)) == (STALE_OK, True)
    assert await cache.lookup(key, cache.stale_limit(Scene.LIBRARY)) is None  # not listed
    clock.offset_ms = 60_000 + 301_000  # past what the home allows
    assert await cache.lookup(key, cache.stale_limit(Scene.MUSEUM)) is None


@pytest.mark.parametrize(
    ("rec", "followed"),
    [
        (replace(UNKNOWN, ttl_seconds=5, max_stale_seconds=300, position=at(3)), True),
        (STALE_OK, False),  # no push could reach it: not kept past its (short) TTL
    ],
)
async def test_some_answers_are_never_served_stale(
    monkeypatch: pytest.MonkeyPatch, rec: Recognition, followed: bool
):
    cache = AnswerCache(CacheConfig(), None, NOON)
    if followed:
        cache.following.add("512021")
    clock = Later(monkeypatch, cache)
    await cache.put(key_of(REF), rec)
    clock.offset_ms = 11_000
    assert await cache.lookup(key_of(REF), 3600) is None


async def test_no_answer_is_kept_stale_past_midnight_in_shanghai(monkeypatch: pytest.MonkeyPatch):
    before_midnight = datetime(2026, 3, 1, 15, 58, tzinfo=UTC)  # 23:58 in Shanghai
    cache = AnswerCache(CacheConfig(), None, lambda: before_midnight)
    cache.following.add("512021")
    await cache.put(key_of(REF), STALE_OK)
    expires = cache.local.expiry(key_of(REF))
    assert expires is not None and expires - time.monotonic() <= 120  # 60 s fresh, 60 stale


def test_a_value_the_previous_release_wrote_to_redis_reads_as_fresh_while_held():
    old = f"{int(CardStatus.ACTIVE)}|3|1767225600000|e1|4".encode()
    entry, expires = decode(old)
    assert (entry.fresh_until_ms, expires, entry.seq) == (0, 1767225600000, 4)
    assert entry.fresh(10**15)
    new = replace(entry, fresh_until_ms=1767225500000)
    assert decode(encode(new, expires)) == (new, expires)
