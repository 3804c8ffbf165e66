"""Trust that fails closed, on running nodes over real mutual TLS (issue 10, items 1 and 4).

What is revoked stays refused whatever happens to ``crl.pem`` while a node runs; a node
does not start without its own revocation list, nor with one older than it had accepted;
and an unusable peer bundle on disk leaves that one peer untrusted — reported on its health
name — instead of stopping the node or its trust watcher.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker._proto.yikatong.v1 import gate_pb2, types_pb2
from broker.cards.model import Scene
from broker.core.errors import ConfigError
from broker.node.server import Node
from broker.testbed import build as testbed
from broker.testbed.operator_client import GateClient, open_channel
from broker.trust import certops, pki
from broker.trust.config import node_server_name
from broker.trust.identity import admin_identity
from broker.trust.store import CRL_HEALTH, peer_health_name
from tests.conftest import ANYUE, DAZU, RONGCHANG, THREE
from tests.trust.test_store import (
    damage_crl,
    peer_bundle_file,
    serial_of,
    until_refused,
    unusable_bundle,
)

SERVING: int = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: int = health_pb2.HealthCheckResponse.NOT_SERVING
TICK_MS = 200  # the nodes' reload tick: a change is seen within a fraction of a second
WITHIN_S = 5.0  # the issue's bound for a change to take effect on a running node
MONITOR = "monitor-01"  # back-office staff (admin): it asks for the trust components' health


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WITHIN_S
    while not await check():
        assert time.monotonic() < deadline, f"not within {WITHIN_S} s: {what}"
        await asyncio.sleep(0.05)


class Running:
    """Nodes of a testbed, with an operator's gate client and a health stub per district."""

    def __init__(self, setups: dict[str, testbed.DistrictSetup], now: datetime) -> None:
        self.setups = setups
        for code, s in setups.items():
            certops.issue_to_files(s.paths, admin_identity(code, MONITOR), now)
        self.nodes: dict[str, Node] = {}
        self._channels: list[grpc.aio.Channel] = []

    async def start(self, *codes: str) -> None:
        for code in codes or tuple(self.setups):
            self.nodes[code] = await Node.start(self.setups[code].config)

    def _open(self, code: str, cert: Path, key: Path) -> grpc.aio.Channel:
        s = self.setups[code]
        ch = open_channel(
            self.nodes[code].address, node_server_name(code), s.paths.ca_cert, cert, key
        )
        self._channels.append(ch)
        return ch

    def gate(self, code: str) -> GateClient:
        """A new connection of the district's operator (the one the tests revoke)."""
        s = self.setups[code]
        return GateClient(self._open(code, s.operator_cert, s.operator_key), s.operator_id)

    def health(self, code: str) -> health_pb2_grpc.HealthStub:
        """Health over mutual TLS, as the district's monitoring asks it (an admin certificate)."""
        paths = self.setups[code].paths
        return health_pb2_grpc.HealthStub(
            self._open(code, paths.admin_cert(MONITOR), paths.admin_key(MONITOR))
        )

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close()
        for node in self.nodes.values():
            await node.stop(grace=0.2)


async def status(stub: health_pb2_grpc.HealthStub, service: str) -> int:
    resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(resp.status)


async def until_status(stub: health_pb2_grpc.HealthStub, service: str, want: int) -> None:
    async def reached() -> bool:
        return await status(stub, service) == want

    name = health_pb2.HealthCheckResponse.ServingStatus.Name(want)
    await until(reached, f"health {service!r} {name}")


@pytest.fixture
async def one(tmp_path: Path, now: datetime) -> AsyncIterator[Running]:
    """One district, not started, reloading its trust files every 200 ms."""
    setups = testbed.build(tmp_path, (DAZU,), now, cards_per_district=5, reload_interval_ms=TICK_MS)
    r = Running(setups, now)
    try:
        yield r
    finally:
        await r.close()


@pytest.fixture
async def three(tmp_path: Path, now: datetime) -> AsyncIterator[Running]:
    """Three districts, not started; bundles refreshed every second."""
    setups = testbed.build(
        tmp_path,
        THREE,
        now,
        cards_per_district=20,
        reload_interval_ms=TICK_MS,
        bundle_refresh_s=1,
    )
    r = Running(setups, now)
    try:
        yield r
    finally:
        await r.close()


# ----------------------------------------------------------------------------- revocation


@pytest.mark.parametrize("accident", ["deleted", "older list"])
async def test_a_revoked_operator_stays_refused_when_crl_pem_is_deleted_or_rolled_back(
    one: Running, now: datetime, accident: str
):
    s = one.setups[DAZU]
    await one.start()
    node = one.nodes[DAZU]
    health = one.health(DAZU)
    card = s.cards[0].ref
    gate = one.gate(DAZU)
    await gate.check(card, Scene.BUS)  # fine before
    older = s.paths.crl.read_bytes()
    certops.revoke(s.paths, serial_of(s.operator_cert), now)
    err = await until_refused(lambda: gate.check(card, Scene.BUS))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in err.details()
    revoked_list = s.paths.crl.read_bytes()
    assert await status(health, CRL_HEALTH) == SERVING

    generation = node.trust.current.generation
    damage_crl(accident, s.paths.crl, older, b"")
    await until_status(health, CRL_HEALTH, NOT_SERVING)  # the node's reload tick saw it
    assert node.trust.current.generation > generation and DAZU in node.trust.current.problems
    assert await status(health, "") == SERVING  # gates keep being answered
    for client in (gate, one.gate(DAZU)):  # the open connection, and a new one
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.check(card, Scene.BUS)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "revoked" in info.value.details()

    pki.write_public(s.paths.crl, revoked_list)  # put right
    await until_status(health, CRL_HEALTH, SERVING)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await one.gate(DAZU).check(card, Scene.BUS)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_node_does_not_start_without_its_own_crl(one: Running):
    s = one.setups[DAZU]
    s.paths.crl.unlink()
    with pytest.raises(ConfigError, match=r"revocation list .*crl\.pem cannot be read"):
        await Node.start(s.config)
    port = int(s.config.listen.rsplit(":", 1)[1])
    with pytest.raises(OSError):  # nothing was left listening
        await asyncio.open_connection("127.0.0.1", port)


async def test_a_restarted_node_refuses_the_older_crl_it_had_moved_past(one: Running, now):
    s = one.setups[DAZU]
    await one.start()
    card = s.cards[0].ref
    gate = one.gate(DAZU)
    older = s.paths.crl.read_bytes()
    certops.revoke(s.paths, serial_of(s.operator_cert), now)
    await until_refused(lambda: gate.check(card, Scene.BUS))
    await one.nodes.pop(DAZU).stop(grace=0.2)

    pki.write_public(s.paths.crl, older)  # restored from a backup while it was down
    with pytest.raises(ConfigError, match="older than number 2, already accepted"):
        await Node.start(s.config)


# ----------------------------------------------------------------------------- peer bundles


async def fresh_check(gate: GateClient, code: str, running: Running) -> gate_pb2.GateDecision:
    """A check at ``gate`` of a card of district ``code`` not asked about before (never cached)."""
    return await gate.check(running.setups[code].cards.pop().ref, Scene.BUS)


async def until_answered_by_peer(gate: GateClient, code: str, running: Running) -> None:
    """Wait for ``code``'s node to answer: nodes start one after another, and a peer's channel
    that found it not yet listening retries after a back-off."""
    card = running.setups[code].cards.pop().ref

    async def answered() -> bool:
        decision = await gate.check(card, Scene.BUS)
        return bool(decision.source == types_pb2.DECISION_SOURCE_PEER)

    await until(answered, f"a card of {code} answered by its node")


@pytest.mark.parametrize("kind", ["not JSON", "list without AKI", "CA without SKI"])
async def test_a_node_with_an_unusable_peer_bundle_starts_with_that_peer_untrusted(
    three: Running, now: datetime, kind: str
):
    dazu = three.setups[DAZU]
    pki.write_public(peer_bundle_file(dazu, ANYUE), unusable_bundle(kind, three.setups[ANYUE], now))
    await three.start()
    health = three.health(DAZU)
    assert await status(health, "") == SERVING
    assert await status(health, CRL_HEALTH) == SERVING
    assert await status(health, peer_health_name(ANYUE)) == NOT_SERVING
    assert await status(health, peer_health_name(RONGCHANG)) == SERVING

    gate = three.gate(DAZU)
    refused = await fresh_check(gate, ANYUE, three)
    assert not refused.allow
    assert refused.source == types_pb2.DECISION_SOURCE_OFFLINE_POLICY
    assert f"district {ANYUE}: is not trusted" in refused.reason
    await until_answered_by_peer(gate, RONGCHANG, three)  # the other peer still works

    # The refresher cannot fetch from a peer it does not trust; it keeps trying, and neither
    # it nor the trust watcher dies of it.
    node = three.nodes[DAZU]
    refresher = node.refresher
    assert refresher is not None

    async def tried_three_times() -> bool:
        return refresher.failures.get(ANYUE, 0) >= 3

    await until(tried_three_times, "three fetches of the untrusted peer's bundle")
    assert set(node.supervisor.failures.values()) == {0}  # no loop failed or was restarted
    assert await status(health, peer_health_name(ANYUE)) == NOT_SERVING
    assert (await fresh_check(gate, ANYUE, three)).source == (
        types_pb2.DECISION_SOURCE_OFFLINE_POLICY
    )


@pytest.mark.parametrize("kind", ["list without AKI", "CA without SKI"])
async def test_a_peer_bundle_turning_unusable_keeps_the_last_good_one_and_the_watcher(
    three: Running, now: datetime, kind: str
):
    dazu = three.setups[DAZU]
    await three.start()
    node = three.nodes[DAZU]
    health = three.health(DAZU)
    gate = three.gate(DAZU)
    await until_answered_by_peer(gate, ANYUE, three)
    bundle_file = peer_bundle_file(dazu, ANYUE)
    good = bundle_file.read_bytes()

    pki.write_public(bundle_file, unusable_bundle(kind, three.setups[ANYUE], now))

    async def reported() -> bool:
        assert node.supervisor.failures["trust-watch"] == 0, "the trust watcher failed"
        return await status(health, peer_health_name(ANYUE)) == NOT_SERVING

    await until(reported, f"health {peer_health_name(ANYUE)!r} NOT_SERVING")
    assert ANYUE in node.trust.current.problems and node.trust.current.trusted(ANYUE)
    # The last good bundle stays in force: the peer's cards are still answered by the peer.
    assert (await fresh_check(gate, ANYUE, three)).source == types_pb2.DECISION_SOURCE_PEER
    assert await status(health, "") == SERVING

    pki.write_public(bundle_file, good)  # put right: the watcher is alive to see it
    await until_status(health, peer_health_name(ANYUE), SERVING)
    assert ANYUE not in node.trust.current.problems
    assert set(node.supervisor.failures.values()) == {0}  # no loop failed or was restarted
