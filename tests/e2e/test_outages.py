"""Gates keep working through a neighbour's outage (issue 15): a frozen peer is skipped.

Anyue runs as a process of its own (``python -m broker serve``) and is frozen
with SIGSTOP, as a hung host would be: its port still accepts connections, and
nothing answers. Dazu's node, in this process, checks never-seen Anyue cards.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import pytest

from broker._proto.yikatong.v1 import gate_pb2
from broker.cards.model import CardRef, Scene
from broker.core.breaker import PROBE_S, THRESHOLD
from broker.node.server import Node
from broker.testbed import build as testbed
from tests.conftest import ANYUE, DAZU, Cluster
from tests.helpers import wait_healthy

SRC = gate_pb2.DecisionSource


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
