"""Recognising other districts' cards (broker.gate.recognizer): cache, then one peer call per card.

A fake PeerClient stands in for the network; the AnswerCache is real (in-process tier, and
once over Redis).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import cast

import pytest
import redis
import structlog
from structlog.testing import capture_logs

from broker.cards.model import CardRef, CardStatus, DecisionSource, Entitlement, Recognition, Scene
from broker.cards.privacy import Hasher
from broker.core.errors import PeerUnavailable
from broker.gate.cache import AnswerCache
from broker.gate.config import CacheConfig
from broker.gate.recognizer import PeerRecognizer
from broker.peers.client import PeerClient

HERE, PEER, STRANGER = "500111", "512021", "500153"
HASHER = Hasher(b"r" * 32)
REF = CardRef(PEER, "C5120210000001")
ACTIVE = Recognition(CardStatus.ACTIVE, (Entitlement.SENIOR_60,), 120)


class FakeClient:
    """Stands in for PeerClient: configured districts, fixed answers, an optional gate."""

    def __init__(
        self,
        answers: dict[str, Recognition] | None = None,
        configured: tuple[str, ...] = (PEER,),
        error: Exception | None = None,
    ) -> None:
        self.answers = answers or {REF.card_number: ACTIVE}
        self.districts = configured
        self.error = error
        self.calls: list[tuple[CardRef, Scene, str]] = []
        self.handles: list[str] = []
        self.release: asyncio.Event | None = None

    def configured(self, district: str) -> bool:
        return district in self.districts

    async def recognize(
        self, ref: CardRef, scene: Scene, request_id: str, handle: str = ""
    ) -> Recognition:
        self.calls.append((ref, scene, request_id))
        self.handles.append(handle)
        if self.release is not None:
            await self.release.wait()
        if self.error is not None:
            raise self.error
        return self.answers[ref.card_number]


class Failures:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def make(
    client: FakeClient, cache: AnswerCache | None = None, on_failure: Failures | None = None
) -> tuple[PeerRecognizer, AnswerCache]:
    cache = cache or AnswerCache(CacheConfig(redis_url=None), None)
    rec = PeerRecognizer(cast(PeerClient, client), cache, HASHER, on_failure or Failures())
    return rec, cache


async def test_a_first_ask_goes_to_the_peer_and_is_cached():
    """PEER the first time, then CACHE from the in-process tier without another peer call."""
    client = FakeClient()
    recognizer, _ = make(client)
    assert recognizer.cached(REF) is None
    assert await recognizer.recognise(REF, Scene.BUS, "r1") == (ACTIVE, DecisionSource.PEER)
    assert client.calls == [(REF, Scene.BUS, "r1")]
    assert recognizer.peer_calls == 1
    assert recognizer.cached(REF) == ACTIVE
    assert await recognizer.recognise(REF, Scene.BUS, "r2") == (ACTIVE, DecisionSource.CACHE)
    assert len(client.calls) == 1 and recognizer.peer_calls == 1


async def test_a_district_without_agreement_is_unavailable_without_a_call():
    """No peer configured for the card's region: PeerUnavailable, no call, no bundle refresh."""
    client, failures = FakeClient(), Failures()
    recognizer, _ = make(client, on_failure=failures)
    with pytest.raises(PeerUnavailable) as info:
        await recognizer.recognise(CardRef(STRANGER, "C5001530000001"), Scene.BUS, "r1")
    assert info.value.district == STRANGER
    assert "C5001530000001" not in str(info.value)
    assert client.calls == [] and recognizer.peer_calls == 0 and failures.count == 0


async def test_concurrent_asks_for_one_card_make_one_peer_call():
    """Single-flight: 20 checks of the same uncached card share one call and one answer."""
    client = FakeClient()
    client.release = asyncio.Event()
    recognizer, _ = make(client)
    tasks = [asyncio.create_task(recognizer.recognise(REF, Scene.BUS, f"r{i}")) for i in range(20)]
    await asyncio.sleep(0.01)
    assert len(client.calls) == 1
    client.release.set()
    results = await asyncio.gather(*tasks)
    assert results == [(ACTIVE, DecisionSource.PEER)] * 20
    assert len(client.calls) == 1 and recognizer.peer_calls == 1


async def test_concurrent_asks_for_different_cards_are_not_merged():
    """Single-flight is per card: two cards, two calls, each its own answer."""
    other = CardRef(PEER, "C5120210000002")
    lost = Recognition(CardStatus.LOST, (), 120)
    client = FakeClient({REF.card_number: ACTIVE, other.card_number: lost})
    client.release = asyncio.Event()
    recognizer, _ = make(client)
    tasks = [
        asyncio.create_task(recognizer.recognise(r, Scene.BUS, "r"))
        for r in (REF, other, REF, other)
    ]
    await asyncio.sleep(0.01)
    client.release.set()
    results = await asyncio.gather(*tasks)
    assert [rec.status for rec, _ in results] == [
        CardStatus.ACTIVE,
        CardStatus.LOST,
        CardStatus.ACTIVE,
        CardStatus.LOST,
    ]
    assert sorted(ref.card_number for ref, _, _ in client.calls) == sorted(
        [REF.card_number, other.card_number]
    )


async def test_errors_are_not_cached_and_trigger_a_bundle_look():
    """A failed call is reported (on_failure), nothing is cached, and the next check asks again."""
    client, failures = FakeClient(error=PeerUnavailable(PEER, "answered UNAVAILABLE")), Failures()
    recognizer, cache = make(client, on_failure=failures)
    with pytest.raises(PeerUnavailable):
        await recognizer.recognise(REF, Scene.BUS, "r1")
    assert failures.count == 1
    assert recognizer.cached(REF) is None and len(cache.local) == 0
    client.error = None
    assert await recognizer.recognise(REF, Scene.BUS, "r2") == (ACTIVE, DecisionSource.PEER)
    assert len(client.calls) == 2


async def test_concurrent_asks_share_one_failure():
    """Every waiter of a failing shared call gets the PeerUnavailable; one call, one report."""
    client, failures = FakeClient(error=PeerUnavailable(PEER, "timeout")), Failures()
    client.release = asyncio.Event()
    recognizer, _ = make(client, on_failure=failures)
    tasks = [asyncio.create_task(recognizer.recognise(REF, Scene.BUS, "r")) for _ in range(5)]
    await asyncio.sleep(0.01)
    client.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, PeerUnavailable) for r in results)
    assert len(client.calls) == 1 and failures.count == 1


async def test_an_unexpected_error_is_not_cached_nor_reported_as_a_peer_failure():
    """A non-PeerUnavailable error propagates, leaves no entry, and does not call on_failure."""
    client, failures = FakeClient(error=RuntimeError("bug")), Failures()
    recognizer, cache = make(client, on_failure=failures)
    with pytest.raises(RuntimeError):
        await recognizer.recognise(REF, Scene.BUS, "r1")
    assert failures.count == 0 and len(cache.local) == 0


async def test_an_answer_with_zero_ttl_is_not_cached():
    """A home district that says 'do not cache' (TTL 0) is asked every time."""
    client = FakeClient({REF.card_number: Recognition(CardStatus.ACTIVE, (), 0)})
    recognizer, _ = make(client)
    for i in range(2):
        _, source = await recognizer.recognise(REF, Scene.BUS, f"r{i}")
        assert source is DecisionSource.PEER
    assert len(client.calls) == 2 and recognizer.cached(REF) is None


async def test_the_cache_key_is_the_issuer_and_the_handle_a_hash_the_logs_never_use():
    """The only entry is under ``<issuer>:<Hasher.card_handle(ref)>``, which holds no card
    number; the home is given that handle, nothing else, and it differs from the card_key
    this district's logs name the card by (the home knows the number behind the handle)."""
    client = FakeClient()
    recognizer, cache = make(client)
    await recognizer.recognise(REF, Scene.BUS, "r1")
    key = f"{PEER}:{HASHER.card_handle(REF)}"
    assert REF.card_number not in key
    assert len(cache.local) == 1
    assert cache.get_local(key) == ACTIVE
    assert cache.get_local(REF.card_number) is None
    assert client.handles == [HASHER.card_handle(REF)]
    assert HASHER.card_handle(REF) != HASHER.card_key(REF)


@pytest.fixture
def all_levels() -> Iterator[None]:
    structlog.reset_defaults()  # every level, whatever an earlier test configured
    yield
    structlog.reset_defaults()


async def test_the_peer_answer_is_logged_without_the_card_number(all_levels: None):
    """The debug event names the card by its keyed hash only."""
    recognizer, _ = make(FakeClient())
    with capture_logs() as events:
        await recognizer.recognise(REF, Scene.BUS, "r1")
    answers = [e for e in events if e["event"] == "peer_answer"]
    assert len(answers) == 1
    assert answers[0]["card"] == HASHER.card_key(REF)  # the logs' name, never the handle
    assert REF.card_number not in repr(events)


async def test_replicas_share_peer_answers_through_redis(redis_db: str):
    """Replica B finds A's answer in Redis (CACHE, no peer call); Redis holds no card number."""
    cfg = CacheConfig(redis_url=redis_db)
    cache_a = AnswerCache.from_config(cfg, HERE)
    cache_b = AnswerCache.from_config(cfg, HERE)
    client_a, client_b = FakeClient(), FakeClient()
    replica_a, _ = make(client_a, cache_a)
    replica_b, _ = make(client_b, cache_b)
    try:
        assert await replica_a.recognise(REF, Scene.BUS, "r1") == (ACTIVE, DecisionSource.PEER)
        assert replica_b.cached(REF) is None  # not in B's in-process tier yet
        got, source = await replica_b.recognise(REF, Scene.BUS, "r2")
        assert source is DecisionSource.CACHE
        assert (got.status, got.entitlements) == (ACTIVE.status, ACTIVE.entitlements)
        assert client_b.calls == [] and replica_b.peer_calls == 0
        filled = replica_b.cached(REF)  # filled from Redis
        assert filled is not None and filled.entitlements == ACTIVE.entitlements
        with redis.Redis.from_url(redis_db) as client:
            keys = list(client.scan_iter("yk:*"))
            assert keys == [f"yk:v2:{HERE}:rec:{PEER}:{HASHER.card_handle(REF)}".encode()]
            value = client.get(keys[0]) or b""
            assert REF.card_number.encode() not in keys[0] + value
    finally:
        await cache_a.close()
        await cache_b.close()
