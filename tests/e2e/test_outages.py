"""Gates keep working through a neighbour's outage (issue 15): a frozen peer is skipped.

Anyue runs as a process of its own (``python -m broker serve``) and is frozen
with SIGSTOP, as a hung host would be: its port still accepts connections, and
nothing answers. Dazu's node, in this process, checks never-seen Anyue cards.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from broker._proto.yikatong.v1 import gate_pb2, types_pb2
from broker.cards.model import CardRef, Scene, shanghai_day
from broker.cards.registry import Registry
from broker.cards.status_change import set_status
from broker.core.breaker import PROBE_S, THRESHOLD, Breaker, State
from broker.node.server import Node
from broker.testbed import build as testbed
from broker.testbed.operator_client import GateClient, open_channel
from broker.trust.config import node_server_name
from tests.conftest import ANYUE, DAZU, Cluster
from tests.e2e.test_lost_card import two_replicas
from tests.helpers import wait_healthy

SRC = types_pb2.DecisionSource


def state(b: Breaker) -> State:
    """Read afresh (mypy keeps an earlier ``is`` check's narrowing across awaits)."""
    return b.state


class Outage:
    def __init__(
        self, cluster: Cluster, setups: dict[str, testbed.DistrictSetup], pid: int
    ) -> None:
        self.cluster = cluster
        self.setups = setups
        self.pid = pid
        self._fresh = iter([c.ref for c in setups[ANYUE].cards if c.status == "active"])

    def fresh(self) -> CardRef:
        """An Anyue card Dazu has never asked about (so nothing is cached)."""
        return next(self._fresh)

    async def timed_check(self) -> tuple[float, gate_pb2.GateDecision]:
        started = time.monotonic()
        d = await self.cluster.gate(DAZU).check(self.fresh(), Scene.BUS)
        return time.monotonic() - started, d


@pytest.fixture
async def outage(tmp_path: Path, now: datetime) -> AsyncIterator[Outage]:
    setups = testbed.build(tmp_path, (DAZU, ANYUE), now, cards_per_district=200)
    env = {k: v for k, v in os.environ.items() if not k.startswith("YIKATONG_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "--log-level", "warning", "serve",
        "--config", str(setups[ANYUE].config_path),
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    cluster: Cluster | None = None
    try:
        await wait_healthy(setups[ANYUE].config.listen, setups[ANYUE], setups[DAZU])
        cluster = Cluster(setups, {DAZU: await Node.start(setups[DAZU].config)})
        yield Outage(cluster, setups, proc.pid)
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
            await proc.wait()
        if cluster is not None:
            await cluster.close()


async def test_a_frozen_peer_is_skipped_at_once_and_used_again_soon_after_it_is_back(
    outage: Outage,
):
    deadline_s = outage.setups[DAZU].config.peering.deadline_ms / 1000
    _, d = await outage.timed_check()
    assert d.allow and d.source == SRC.DECISION_SOURCE_PEER
    os.kill(outage.pid, signal.SIGSTOP)
    waited = [await outage.timed_check() for _ in range(THRESHOLD)]
    assert all(t >= deadline_s * 0.9 and not d.allow for t, d in waited)  # each waited
    skipped = [await outage.timed_check() for _ in range(20)]
    for _, d in skipped:
        assert not d.allow and d.source == SRC.DECISION_SOURCE_OFFLINE_POLICY
        assert "not asked" in d.reason
    # Refused at once: none of them waited for the deadline (a probe every half second
    # may; this loop is over long before the first).
    assert max(t for t, _ in skipped) < deadline_s / 2
    os.kill(outage.pid, signal.SIGCONT)
    back = time.monotonic()
    while True:
        _, d = await outage.timed_check()
        if d.allow:
            break
        assert time.monotonic() - back < 3.0, "the peer was not used again"
        await asyncio.sleep(0.02)
    again = time.monotonic() - back
    print(f"peer used again {again * 1000:.0f} ms after it was back")
    assert d.source == SRC.DECISION_SOURCE_PEER
    assert again < 1.0 + PROBE_S + deadline_s  # CI's loose bound; the figure is printed


# ---------------------------------------------------------------- a frozen Redis


async def test_a_frozen_redis_slows_no_gate_and_a_lost_card_still_reaches_every_replica(
    tmp_path: Path, now: datetime, private_redis: tuple[str, int]
):
    """Redis frozen (SIGSTOP): after three timeouts its breaker opens and checks stop
    waiting for it; a card set lost meanwhile is refused at both replicas (each follows the
    home itself, into its own tier); once Redis is back its breaker closes."""
    url, redis_pid = private_redis
    setups = testbed.build(tmp_path, (DAZU, ANYUE), now, cards_per_district=500, redis_url=url)
    cfg = setups[DAZU].config
    c = await two_replicas(setups)
    nodes = c.nodes
    registry = Registry(setups[ANYUE].config.registry)
    try:
        cards = iter([x.ref for x in setups[ANYUE].cards if x.status == "active"])
        lost = next(cards)
        for name in ("r1", "r2"):
            assert (await c.gate(name).check(lost, Scene.BUS)).allow
        os.kill(redis_pid, signal.SIGSTOP)
        tier = nodes["r1"].cache.remote
        assert tier is not None
        timeout_s = cfg.cache.redis_timeout_ms / 1000
        for _ in range(THRESHOLD):  # each waits for Redis once (the read; the write is behind)
            assert (await c.gate("r1").check(next(cards), Scene.BUS)).allow
        assert tier.breaker.state is State.OPEN
        took = []
        for _ in range(10):
            started = time.monotonic()
            assert (await c.gate("r1").check(next(cards), Scene.BUS)).allow  # asked the peer
            took.append(time.monotonic() - started)
        assert statistics.median(took) < timeout_s  # Redis is not waited for any more
        assert tier.breaker.refused > 0
        set_status(registry, [lost.card_number], "lost", datetime.now(UTC))
        for name in ("r1", "r2"):
            for _ in range(150):
                if not (await c.gate(name).check(lost, Scene.BUS)).allow:
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError(f"{name} still allows the lost card with Redis frozen")
        os.kill(redis_pid, signal.SIGCONT)
        for _ in range(150):  # the next probe finds it back
            await c.gate("r1").check(next(cards), Scene.BUS)
            if state(tier.breaker) is State.CLOSED:
                break
            await asyncio.sleep(0.02)
        assert state(tier.breaker) is State.CLOSED
    finally:
        registry.close()
        await c.close()


async def test_a_killed_redis_fails_no_check_and_is_logged_as_a_change_of_state(
    tmp_path: Path, now: datetime, private_redis: tuple[str, int]
):
    """Dazu as a process of its own (``broker serve --log-json``, its log read back) with a
    Redis of the test's own, killed (SIGKILL) under checks: every check is answered (cards
    in the in-process tier from it, never-seen ones through Anyue), none of the in-process
    hits waits as long as a Redis timeout, and the log holds Redis's change of state once,
    not a line per failed call."""
    url, redis_pid = private_redis
    setups = testbed.build(tmp_path, (DAZU, ANYUE), now, cards_per_district=500, redis_url=url)
    dazu = setups[DAZU]
    anyue = await Node.start(setups[ANYUE].config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("YIKATONG_")}
    log_path = tmp_path / "dazu.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "broker", "--log-json", "--log-level", "info", "serve",
            "--config", str(dazu.config_path), env=env, stdout=log, stderr=log,
        )  # fmt: skip
    ch = open_channel(
        dazu.config.listen,
        node_server_name(DAZU),
        dazu.paths.ca_cert,
        dazu.operator_cert,
        dazu.operator_key,
    )
    try:
        await wait_healthy(dazu.config.listen, dazu, setups[ANYUE])
        gate = GateClient(ch, dazu.operator_id)
        today = shanghai_day(now)
        refs = [
            c.ref for c in setups[ANYUE].cards if c.status == "active" and c.valid_until >= today
        ]
        held, fresh = refs[:20], iter(refs[20:])
        for ref in held:
            assert (await gate.check(ref, Scene.BUS)).source == SRC.DECISION_SOURCE_PEER
        os.kill(redis_pid, signal.SIGKILL)
        kept_at = log_path.stat().st_size
        hits: list[float] = []
        asked = 0
        until = time.monotonic() + 3.0  # several of the breaker's probes (one per 0.5 s) fail
        while time.monotonic() < until or len(hits) < 300:
            for ref in held:
                started = time.monotonic()
                d = await gate.check(ref, Scene.BUS)
                hits.append(time.monotonic() - started)
                assert d.allow and d.source == SRC.DECISION_SOURCE_CACHE, d
            new = next(fresh, None)  # a fast machine may run out of never-seen cards
            if new is not None:
                d = await gate.check(new, Scene.BUS)  # Redis read fails: asks Anyue
                assert d.allow and d.source == SRC.DECISION_SOURCE_PEER, d
                asked += 1
        assert asked >= 50  # many never-seen cards went past the failing Redis to Anyue
        timeout_s = dazu.config.cache.redis_timeout_ms / 1000
        assert sum(t >= timeout_s for t in hits) <= len(hits) // 20, sorted(hits)[-10:]
        await asyncio.sleep(0.5)  # the write-behind queue has tried its writes
        after = [json.loads(line) for line in log_path.read_bytes()[kept_at:].splitlines()]
        events = collections.Counter(e["event"] for e in after)
        assert events["redis_failing"] == 1, events
        assert max(events.values()) <= 3, events  # nothing logged per call
    finally:
        await ch.close()
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
        await anyue.stop(grace=0)


# ---------------------------------------------------------------- a home away past the TTL


async def test_a_home_away_past_the_ttl_is_answered_stale_within_its_bound_then_offline(
    tmp_path: Path, now: datetime
):
    """Anyue advertises a 1 s TTL and honours its answers 3 s past it; Dazu serves them
    STALE up to 1 s past at a bus, 600 s at a museum. Anyue stops: fresh from cache for
    1 s, then STALE (at the bus only for its first second), then the offline policy; once
    Anyue is back, its answers are used again within a second."""
    setups = testbed.build(tmp_path, (DAZU, ANYUE), now, cards_per_district=50)
    home_cfg = setups[ANYUE].config
    home_cfg = replace(
        home_cfg,
        recognition=replace(home_cfg.recognition, cache_ttl_seconds=1, max_stale_seconds=3),
    )
    cfg = setups[DAZU].config
    cfg = replace(cfg, cache=replace(cfg.cache, max_stale_seconds={"bus": 1, "museum": 600}))
    nodes = {ANYUE: await Node.start(home_cfg), DAZU: await Node.start(cfg)}
    c = Cluster(setups, nodes)
    card = next(x.ref for x in setups[ANYUE].cards if x.status == "active")
    gate = c.gate(DAZU)

    async def source(scene: Scene) -> int:
        d = await gate.check(card, scene)
        assert d.allow == (d.source != SRC.DECISION_SOURCE_OFFLINE_POLICY)
        return int(d.source)

    try:
        # Only a home whose changes Dazu follows is served STALE: its stream must be open
        # before the answer is cached (on a busy machine it may open after the first check).
        async with asyncio.timeout(10):
            await nodes[DAZU].watchers[ANYUE].connected.wait()
        assert await source(Scene.MUSEUM) == SRC.DECISION_SOURCE_PEER
        answered = time.monotonic()
        await nodes.pop(ANYUE).stop(grace=0)
        assert await source(Scene.BUS) == SRC.DECISION_SOURCE_CACHE
        await asyncio.sleep(max(answered + 1.2 - time.monotonic(), 0))  # past the TTL
        assert await source(Scene.MUSEUM) == SRC.DECISION_SOURCE_STALE
        assert await source(Scene.BUS) == SRC.DECISION_SOURCE_STALE
        await asyncio.sleep(max(answered + 2.3 - time.monotonic(), 0))  # 1.3 s past it
        assert await source(Scene.BUS) == SRC.DECISION_SOURCE_OFFLINE_POLICY
        assert await source(Scene.MUSEUM) == SRC.DECISION_SOURCE_STALE
        await asyncio.sleep(max(answered + 4.3 - time.monotonic(), 0))  # past what Anyue allows
        assert await source(Scene.MUSEUM) == SRC.DECISION_SOURCE_OFFLINE_POLICY
        nodes[ANYUE] = await Node.start(home_cfg)
        back = time.monotonic()
        while await source(Scene.MUSEUM) == SRC.DECISION_SOURCE_OFFLINE_POLICY:
            assert time.monotonic() - back < 3.0, "Anyue's answers were not used again"
            await asyncio.sleep(0.02)
        print(f"home used again {(time.monotonic() - back) * 1000:.0f} ms after it was back")
        assert time.monotonic() - back < 1.0 + PROBE_S
    finally:
        await c.close()
