"""Replicas of a home on several hosts share one PostgreSQL registry (issue 14).

Anyue runs two replicas, ``a1`` and ``a2``, on one PostgreSQL registry: one
card table, one status log, one set of peers' handles. Dazu's node asks
``a1`` (its configured address) and follows ``a1``'s changes; ``broker
registry set-status`` runs as a process of its own, as on a back-office host.
Whatever replica a peer asked, and whatever replica it follows, the change
reaches it: the log and the handles are the database's, and a commit wakes
every replica's feed (``NOTIFY``).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import psycopg
import pytest

from broker._proto.yikatong.v1 import recognition_pb2, recognition_pb2_grpc, types_pb2
from broker.cards import status_log
from broker.cards.model import CardRef, Scene
from broker.cards.registry import Registry
from broker.cards.wire import position_to_wire
from broker.node.server import Node
from broker.testbed import build as testbed
from tests.conftest import ANYUE, DAZU, Cluster
from tests.e2e.test_lost_card import BOUND_S, set_status
from tests.helpers import node_channel


@dataclass
class Shared:
    cluster: Cluster
    setups: dict[str, testbed.DistrictSetup]

    def active_cards(self, n: int) -> list[CardRef]:
        return [c.ref for c in self.setups[ANYUE].cards if c.status == "active"][:n]

    async def refused_at_dazu(self, card: CardRef) -> None:
        for _ in range(int(BOUND_S / 0.02)):
            if not (await self.cluster.gate(DAZU).check(card, Scene.BUS)).allow:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"still allowed at Dazu after {BOUND_S} s")


@pytest.fixture
async def s(
    tmp_path: Path, now: datetime, redis_db: str, postgres_url: str
) -> AsyncIterator[Shared]:
    prefix = f"yk{secrets.token_hex(3)}"
    setups = testbed.build(
        tmp_path,
        (DAZU, ANYUE),
        now,
        cards_per_district=30,
        redis_url=redis_db,
        registry_url=postgres_url,
        ledger_schema_prefix=prefix,
    )
    home = setups[ANYUE].config
    assert home.registry.url == postgres_url and home.registry.path is None
    nodes: dict[str, Node] = {}
    try:
        nodes["a1"] = await Node.start(home)
        nodes["a2"] = await Node.start(replace(home, listen="127.0.0.1:0"))
        nodes[DAZU] = await Node.start(setups[DAZU].config)
        async with asyncio.timeout(5):
            await nodes[DAZU].watchers[ANYUE].connected.wait()
        yield Shared(Cluster({**setups, "a1": setups[ANYUE], "a2": setups[ANYUE]}, nodes), setups)
    finally:
        for node in nodes.values():
            await node.stop(grace=0.2)
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            for code in (DAZU, ANYUE):
                conn.execute(f"DROP SCHEMA IF EXISTS {prefix}_reg_{code} CASCADE")


def head(s: Shared) -> recognition_pb2.LogPosition:
    registry = Registry(s.setups[ANYUE].config.registry)
    try:
        return position_to_wire(status_log.head(registry.db))
    finally:
        registry.close()


async def test_a_card_reported_lost_on_a_back_office_host_is_refused_at_the_peer(s: Shared):
    card, other = s.active_cards(2)
    assert (await s.cluster.gate(DAZU).check(card, Scene.BUS)).allow  # asked a1: cached
    assert (await s.cluster.gate(DAZU).check(other, Scene.BUS)).allow
    set_status(s.setups[ANYUE], [card.card_number], "lost")
    await s.refused_at_dazu(card)
    assert (await s.cluster.gate(DAZU).check(other, Scene.BUS)).allow  # only that card


async def test_the_other_replica_tells_a_peer_of_a_card_it_asked_the_first_about(s: Shared):
    """Dazu asked a1; a stream from a2 carries the change under Dazu's handle, and nothing
    of a card Dazu never asked about."""
    card, never_asked = s.active_cards(2)
    ch = node_channel(s.cluster.nodes["a2"].address, s.setups[ANYUE], s.setups[DAZU])
    try:
        request = recognition_pb2.WatchStatusRequest(after=head(s))
        stream = recognition_pb2_grpc.RecognitionStub(ch).WatchStatus(request, timeout=20)
        greeting = await stream.read()
        assert greeting.WhichOneof("update") == "progress"
        assert (await s.cluster.gate(DAZU).check(card, Scene.BUS)).allow  # a1 keeps the handle
        set_status(s.setups[ANYUE], [never_asked.card_number], "lost")
        set_status(s.setups[ANYUE], [card.card_number], "lost")
        async with asyncio.timeout(BOUND_S):
            update = await stream.read()
            while update.WhichOneof("update") != "change":
                update = await stream.read()
        change = update.change
        assert change.status == types_pb2.CARD_STATUS_LOST
        assert len(change.handle) == 32 and card.card_number not in str(update)
        assert change.position.seq == head(s).seq  # the second change: the first was not told
        stream.cancel()
    finally:
        await ch.close()
    await s.refused_at_dazu(card)


async def test_the_homes_own_gates_read_a_copy_that_follows_the_registry(s: Shared):
    """Each replica's gates read its copy of the cards in memory (no round trip per check),
    and the copy follows a change made on another host as the peers do."""
    card = s.active_cards(1)[0]
    for name in ("a1", "a2"):
        d = await s.cluster.gate(name).check(card, Scene.BUS)
        assert d.allow and d.source == types_pb2.DecisionSource.DECISION_SOURCE_HOME
        home = s.cluster.nodes[name].home
        assert home is not None and home.copy is not None and home.copy.loads == 1
    set_status(s.setups[ANYUE], [card.card_number], "lost")
    for name in ("a1", "a2"):
        for _ in range(int(BOUND_S / 0.02)):
            if not (await s.cluster.gate(name).check(card, Scene.BUS)).allow:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError(f"{name} still allows its own lost card")
