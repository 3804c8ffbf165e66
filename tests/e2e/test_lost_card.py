"""A card reported lost is refused at every replica of every peer within a second (issue 14).

Running nodes — two replicas of Dazu sharing a real Redis, Anyue as the card's
home — and ``broker registry set-status`` run as operations staff run it, a
process of its own. CI asserts a loose bound (3 s); ``scripts/bench`` gives
the figure.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import pytest
import redis

from broker._proto.yikatong.v1 import types_pb2
from broker.cards import status_log
from broker.cards.model import CardRef, CardStatus, Scene
from broker.cards.privacy import load_key_file
from broker.cards.registry import Registry
from broker.gate.cache import AnswerCache
from broker.gate.config import CacheConfig
from broker.node.server import Node
from broker.testbed import build as testbed
from tests.conftest import ANYUE, DAZU, Cluster

SRC = types_pb2.DecisionSource
BOUND_S = 3.0


@dataclass
class Replicas:
    cluster: Cluster
    setups: dict[str, testbed.DistrictSetup]
    redis_url: str

    def node(self, name: str) -> Node:
        return self.cluster.nodes[name]


@pytest.fixture
async def replicas(tmp_path: Path, now: datetime, redis_db: str) -> AsyncIterator[Replicas]:
    setups = testbed.build(tmp_path, (DAZU, ANYUE), now, cards_per_district=30, redis_url=redis_db)
    c = await two_replicas(setups)
    try:
        yield Replicas(c, setups, redis_db)
    finally:
        await c.close()


async def two_replicas(setups: dict[str, testbed.DistrictSetup]) -> Cluster:
    """Anyue's node, and Dazu's as two replicas ``r1`` and ``r2`` (one config, two ports),
    each following Anyue's changes before it is returned."""
    cfg = setups[DAZU].config
    nodes = {
        ANYUE: await Node.start(setups[ANYUE].config),
        "r1": await Node.start(cfg),
        "r2": await Node.start(replace(cfg, listen="127.0.0.1:0")),
    }
    c = Cluster({**setups, "r1": setups[DAZU], "r2": setups[DAZU]}, nodes)
    try:
        for name in ("r1", "r2"):
            async with asyncio.timeout(5):
                await nodes[name].watchers[ANYUE].connected.wait()
    except BaseException:
        await c.close()
        raise
    return c


def set_status(setup: testbed.DistrictSetup, cards: list[str], status: str) -> None:
    """``broker registry set-status``, as a process of its own, the numbers on stdin."""
    done = subprocess.run(
        [sys.executable, "-m", "broker", "registry", "set-status", "--status", status,
         "--config", str(setup.config_path)],
        input="\n".join(cards) + "\n", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    assert all(c not in done.stdout + done.stderr for c in cards)


def active_cards(setups: dict[str, testbed.DistrictSetup], n: int) -> list[CardRef]:
    return [c.ref for c in setups[ANYUE].cards if c.status == "active"][:n]


async def eventually(holds: Callable[[], bool], bound: float = BOUND_S) -> None:
    """Until ``holds()`` (fails past ``bound`` seconds)."""
    async with asyncio.timeout(bound):
        while True:
            if holds():
                return
            await asyncio.sleep(0.01)


async def refused_within(r: Replicas, names: tuple[str, ...], card: CardRef, bound: float) -> float:
    """Seconds until every named replica's gate refuses ``card``; fails past ``bound``."""
    start = time.monotonic()
    pending = set(names)
    while pending:
        for name in sorted(pending):
            d = await r.cluster.gate(name).check(card, Scene.BUS)
            if not d.allow:
                pending.discard(name)
        assert time.monotonic() - start < bound, f"still allowed at {sorted(pending)}"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def test_a_card_marked_lost_at_home_is_refused_at_both_replicas_of_a_peer(r: Replicas):
    card, other = active_cards(r.setups, 2)
    for name in ("r1", "r2"):
        d = await r.cluster.gate(name).check(card, Scene.BUS)
        assert d.allow and d.source in (SRC.DECISION_SOURCE_PEER, SRC.DECISION_SOURCE_CACHE)
        assert (await r.cluster.gate(name).check(other, Scene.BUS)).allow
    set_status(r.setups[ANYUE], [card.card_number], "lost")
    took = await refused_within(r, ("r1", "r2"), card, BOUND_S)
    print(f"lost card refused at both replicas after {took * 1000:.0f} ms")
    for name in ("r1", "r2"):
        d = await r.cluster.gate(name).check(card, Scene.BUS)
        assert d.source == SRC.DECISION_SOURCE_CACHE  # refused from cache: the push wrote it
        assert (await r.cluster.gate(name).check(other, Scene.BUS)).allow  # only that card
    set_status(r.setups[ANYUE], [card.card_number], "active")  # found again
    start = time.monotonic()
    while not (await r.cluster.gate("r1").check(card, Scene.BUS)).allow:
        assert time.monotonic() - start < BOUND_S
        await asyncio.sleep(0.02)


@pytest.fixture
def r(replicas: Replicas) -> Replicas:
    return replicas


async def test_a_slow_active_answer_arriving_after_the_lost_change_never_lets_the_card_in(
    r: Replicas,
):
    """r1's peer call is answered ACTIVE, then held (a hook between the answer and its
    caching) while the card is reported lost and the change reaches r1; let go, the older
    answer loses to the change in both tiers."""
    [card] = active_cards(r.setups, 1)
    held, release = asyncio.Event(), asyncio.Event()

    async def hold(ref: CardRef) -> None:
        held.set()
        await release.wait()

    r1 = r.node("r1")
    r1.peers.before_caching = hold
    in_flight = asyncio.ensure_future(r.cluster.gate("r1").check(card, Scene.BUS))
    async with asyncio.timeout(5):
        await held.wait()
    applied = r1.watchers[ANYUE].applied
    set_status(r.setups[ANYUE], [card.card_number], "lost")
    await eventually(
        lambda: r1.watchers[ANYUE].applied > applied and r.node("r2").watchers[ANYUE].applied > 0
    )
    release.set()
    first = await in_flight
    assert first.allow  # the answer it was given when it asked
    r1.peers.before_caching = None
    for name in ("r1", "r2"):
        d = await r.cluster.gate(name).check(card, Scene.BUS)
        assert not d.allow and d.source == SRC.DECISION_SOURCE_CACHE, name
    # Redis itself (not only each replica's own tier, which its own stream updated): the
    # late ACTIVE lost the compare-and-set there too.
    hasher = load_key_file(r.setups[DAZU].paths.hash_key)
    shared = AnswerCache.from_config(CacheConfig(redis_url=r.redis_url, local_max_entries=0), DAZU)
    try:
        got = await shared.get(f"{ANYUE}:{hasher.card_handle(card)}")
        assert got is not None and got.status is CardStatus.LOST
    finally:
        await shared.close()


async def test_a_peer_that_never_asked_about_a_card_is_told_nothing_of_it(r: Replicas):
    asked, never = active_cards(r.setups, 2)
    await r.cluster.gate("r1").check(asked, Scene.BUS)
    set_status(r.setups[ANYUE], [never.card_number], "lost")
    set_status(r.setups[ANYUE], [asked.card_number], "lost")
    await refused_within(r, ("r1", "r2"), asked, BOUND_S)
    for name in ("r1", "r2"):
        assert r.node(name).watchers[ANYUE].applied == 1  # the one it asked about


async def test_changes_made_while_the_district_was_down_reach_redis_when_it_is_back(
    r: Replicas,
):
    """Both replicas stop (their watchers with them); the card is reported lost; Redis still
    holds the old answer. A replica started again resumes from the district's cursor in
    Redis, applies the change, and the card is refused."""
    [card] = active_cards(r.setups, 1)
    assert (await r.cluster.gate("r1").check(card, Scene.BUS)).allow
    for name in ("r1", "r2"):
        await r.node(name).stop()
    set_status(r.setups[ANYUE], [card.card_number], "lost")
    set_status(r.setups[ANYUE], [c.card_number for c in active_cards(r.setups, 5)[1:]], "suspended")
    back = await Node.start(r.setups[DAZU].config)
    r.cluster.nodes["r1"] = back
    r.cluster.nodes.pop("r2")
    took = await refused_within(r, ("r1",), card, BOUND_S)
    assert back.watchers[ANYUE].flushes == 0  # it resumed: nothing was dropped
    assert back.watchers[ANYUE].applied >= 1
    print(f"refused {took * 1000:.0f} ms after the restart")


async def test_a_reset_home_log_makes_the_peer_drop_that_districts_answers(r: Replicas):
    card, other = active_cards(r.setups, 2)
    for c in (card, other):
        assert (await r.cluster.gate("r1").check(c, Scene.BUS)).allow
    with redis.Redis.from_url(r.redis_url) as client:
        assert list(client.scan_iter(f"yk:v2:{DAZU}:rec:{ANYUE}:*"))
    before = {n: r.node(n).watchers[ANYUE].flushes for n in ("r1", "r2")}  # 1 at start
    registry = Registry(r.setups[ANYUE].config.registry)
    try:
        status_log.reset(registry.db, "f" * 32, datetime.now().astimezone())
    finally:
        registry.close()
    await eventually(lambda: all(r.node(n).watchers[ANYUE].flushes > before[n] for n in before))
    with redis.Redis.from_url(r.redis_url) as client:
        assert not list(client.scan_iter(f"yk:v2:{DAZU}:rec:{ANYUE}:*"))
    assert r.node("r1").peers.cached(card) is None
    d = await r.cluster.gate("r1").check(card, Scene.BUS)
    assert d.allow and d.source == SRC.DECISION_SOURCE_PEER  # asked again


async def test_streams_end_with_the_connections_age_and_resume_without_loss_or_flush(
    tmp_path: Path, now: datetime, redis_db: str
):
    """With connections aged every 2 s at the home, its WatchStatus streams end with them
    (the grace of a long exchange does not keep them): the peer resumes from its cursor each
    time, drops nothing, and a change after several resumptions still arrives."""
    setups = testbed.build(tmp_path, (DAZU, ANYUE), now, cards_per_district=10, redis_url=redis_db)
    home = setups[ANYUE].config
    home = replace(home, tls=replace(home.tls, max_connection_age_s=2))
    nodes = {ANYUE: await Node.start(home), "r1": await Node.start(setups[DAZU].config)}
    c = Cluster({**setups, "r1": setups[DAZU]}, nodes)
    try:
        r = Replicas(c, setups, redis_db)
        [card] = active_cards(setups, 1)
        assert (await c.gate("r1").check(card, Scene.BUS)).allow
        watcher = nodes["r1"].watchers[ANYUE]
        await eventually(lambda: watcher.streams >= 3, bound=15)
        flushes = watcher.flushes  # the first stream's (no cursor yet); none since
        set_status(setups[ANYUE], [card.card_number], "lost")
        await refused_within(r, ("r1",), card, BOUND_S)
        assert watcher.flushes == flushes and watcher.applied == 1
    finally:
        await c.close()
