"""The answer cache: bounded in-process tier, shared Redis tier, keyed-hash keys."""

from __future__ import annotations

import asyncio

import redis

from broker.cards.model import CardRef, CardStatus, Entitlement, Recognition
from broker.cards.privacy import Hasher
from broker.gate.cache import AnswerCache, LocalTier, decode, encode
from broker.gate.config import CacheConfig

HASHER = Hasher(b"s" * 32)
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


def test_redis_value_round_trips():
    rec, expires = decode(encode(ACTIVE, 1_700_000_000_123))
    assert (rec.status, rec.entitlements, expires) == (
        ACTIVE.status,
        ACTIVE.entitlements,
        1_700_000_000_123,
    )


async def test_unknown_answers_are_cached_only_briefly():
    cache = AnswerCache(CacheConfig(unknown_ttl_seconds=7, max_ttl_seconds=100), None)
    assert cache.ttl_for(UNKNOWN) == 7
    assert cache.ttl_for(Recognition(CardStatus.ACTIVE, (), 60)) == 60
    assert cache.ttl_for(Recognition(CardStatus.ACTIVE, (), 5000)) == 100


async def test_in_process_only_when_no_redis_is_configured():
    cache = AnswerCache.from_config(CacheConfig(redis_url=None), "500111")
    key = HASHER.card_key(REF)
    await cache.put(key, ACTIVE)
    assert cache.remote is None
    assert await cache.get(key) == ACTIVE


async def test_replicas_share_answers_through_redis_under_hashed_keys(redis_db: str):
    cfg = CacheConfig(redis_url=redis_db, unknown_ttl_seconds=3)
    replica_a = AnswerCache.from_config(cfg, "500111")
    replica_b = AnswerCache.from_config(cfg, "500111")
    key = HASHER.card_key(REF)
    try:
        await replica_a.put(key, ACTIVE)
        assert replica_b.get_local(key) is None
        got = await replica_b.get(key)
        assert got is not None and got.status is CardStatus.ACTIVE
        assert got.entitlements == ACTIVE.entitlements
        assert replica_b.get_local(key) is not None  # filled from Redis
        other = HASHER.card_key(CardRef("512021", "C5120210000002"))
        await replica_a.put(other, UNKNOWN)
        client = redis.Redis.from_url(redis_db)
        keys = [k.decode() for k in client.scan_iter("yk:v1:500111:*")]
        assert sorted(keys) == sorted([f"yk:v1:500111:rec:{key}", f"yk:v1:500111:rec:{other}"])
        assert all(REF.card_number not in k for k in keys)
        assert all(REF.card_number.encode() not in (client.get(k) or b"") for k in keys)
        assert 0 < client.pttl(f"yk:v1:500111:rec:{other}") <= 3000
        assert 3000 < client.pttl(f"yk:v1:500111:rec:{key}") <= 120_000
    finally:
        await replica_a.close()
        await replica_b.close()


async def test_a_dead_redis_is_a_miss_not_a_failure():
    cfg = CacheConfig(redis_url="redis://127.0.0.1:1/0", redis_timeout_ms=50, local_max_entries=0)
    cache = AnswerCache.from_config(cfg, "500111")
    key = HASHER.card_key(REF)
    try:
        await cache.put(key, ACTIVE)
        assert await cache.get(key) is None
    finally:
        await cache.close()


async def test_concurrent_redis_reads_share_round_trips(redis_db: str):
    cfg = CacheConfig(redis_url=redis_db, local_max_entries=0)
    writer = AnswerCache.from_config(cfg, "500111")
    reader = AnswerCache.from_config(cfg, "500111")
    refs = [CardRef("512021", f"C51202100{i:05d}") for i in range(40)]
    keys = [HASHER.card_key(r) for r in refs]
    client = redis.Redis.from_url(redis_db)
    try:
        for i, key in enumerate(keys[:30]):
            await writer.put(key, ACTIVE if i % 2 else UNKNOWN)
        before = client.info("commandstats").get("cmdstat_mget", {}).get("calls", 0)
        got = await asyncio.gather(*(reader.get(k) for k in keys))
        after = client.info("commandstats")["cmdstat_mget"]["calls"]
        assert [g.status if g else None for g in got] == [
            (CardStatus.ACTIVE if i % 2 else CardStatus.UNKNOWN) if i < 30 else None
            for i in range(40)
        ]
        assert 1 <= after - before < 40  # coalesced, not one round trip per read
    finally:
        await writer.close()
        await reader.close()
