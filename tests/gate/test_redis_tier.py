"""The Redis tier (broker/gate/redis_tier.py): its values, and reads that share round trips."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime

import redis

from broker.cards.model import CardRef, CardStatus, Entitlement, LogPosition, Recognition
from broker.cards.privacy import Hasher
from broker.gate.cache import AnswerCache
from broker.gate.config import CacheConfig
from broker.gate.entries import Entry
from broker.gate.redis_tier import decode, encode

HASHER = Hasher(b"s" * 32)
ACTIVE = Recognition(CardStatus.ACTIVE, (Entitlement.SENIOR_60, Entitlement.DISABLED), 120)
UNKNOWN = Recognition(CardStatus.UNKNOWN, (), 600)


def NOON() -> datetime:
    return datetime(2026, 3, 1, 4, 0, tzinfo=UTC)


def key_of(ref: CardRef) -> str:
    return f"{ref.issuer_region}:{HASHER.card_key(ref)}"


def at(seq: int, epoch: str = "e1") -> LogPosition:
    return LogPosition(epoch, seq, "m" if seq else "")


def test_redis_value_round_trips():
    entry, expires = decode(encode(Entry(ACTIVE), 1_700_000_000_123))
    assert entry.rec is not None and expires == 1_700_000_000_123
    assert (entry.rec.status, entry.rec.entitlements) == (ACTIVE.status, ACTIVE.entitlements)
    positioned = Entry.of(replace(ACTIVE, position=at(7)), at(7))
    back, _ = decode(encode(positioned, 1))
    assert (back.epoch, back.seq) == ("e1", 7) and back.rec is not None
    tomb, _ = decode(encode(Entry(None, "e1", 9), 1))
    assert tomb == Entry(None, "e1", 9)


async def test_concurrent_redis_reads_share_round_trips(redis_db: str):
    cfg = CacheConfig(redis_url=redis_db, local_max_entries=0)
    writer = AnswerCache.from_config(cfg, "500111", wall=NOON)
    reader = AnswerCache.from_config(cfg, "500111", wall=NOON)
    refs = [CardRef("512021", f"C51202100{i:05d}") for i in range(40)]
    keys = [key_of(r) for r in refs]
    client = redis.Redis.from_url(redis_db)
    try:
        for i, key in enumerate(keys[:30]):
            await writer.put(key, ACTIVE if i % 2 else UNKNOWN)
            await writer.writes.settled()
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
