"""Health with component detail for this district only (broker/node/health.py), on a real node.

The overall status and the services are public; ``yikatong.trust.*``, ``yikatong.ledger``,
``yikatong.redis`` and ``yikatong.task.*`` are for the district's own node and its admins.
Also here: each supervised loop of a node made to raise recovers, and health showed it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.node.server import Node
from broker.node.supervisor import task_health_name
from broker.testbed import build as testbed
from broker.trust import certops
from broker.trust.identity import admin_identity, operator_identity
from tests.conftest import ANYUE, DAZU, Cluster
from tests.helpers import caller_channel, node_channel

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
COMPONENT = "yikatong.trust.crl"


@pytest.fixture
async def callers(cluster: Cluster, now: datetime) -> AsyncIterator[dict[str, grpc.aio.Channel]]:
    dazu, anyue = cluster.setups[DAZU], cluster.setups[ANYUE]
    address = cluster.nodes[DAZU].address
    ca = certops.active_ca(dazu.paths)
    channels = {
        "admin": caller_channel(address, dazu, ca, admin_identity(DAZU, "ops-1"), now),
        "operator": caller_channel(address, dazu, ca, operator_identity(DAZU, "bus-9"), now),
        "own-node": node_channel(address, dazu, dazu),
        "peer-node": node_channel(address, dazu, anyue),
    }
    yield channels
    for ch in channels.values():
        await ch.close()


async def check(ch: grpc.aio.Channel, service: str) -> int | grpc.StatusCode:
    try:
        resp = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return int(resp.status)


async def test_components_are_visible_to_the_own_node_and_admins_only(callers):
    for who in ("admin", "own-node"):
        assert await check(callers[who], COMPONENT) == SERVING, who
        assert await check(callers[who], task_health_name("trust-watch")) == SERVING, who
    for who in ("operator", "peer-node"):
        # The same answer as for a name that does not exist.
        assert await check(callers[who], COMPONENT) == grpc.StatusCode.NOT_FOUND, who
        assert await check(callers[who], "yikatong.nothing") == grpc.StatusCode.NOT_FOUND
    for who in callers:
        assert await check(callers[who], "") == SERVING, who
        assert await check(callers[who], "yikatong.v1.Gate") == SERVING, who


async def test_watch_of_a_hidden_component_says_unknown_and_of_a_visible_one_its_status(callers):
    hidden = health_pb2_grpc.HealthStub(callers["peer-node"]).Watch(
        health_pb2.HealthCheckRequest(service=COMPONENT), timeout=5
    )
    assert [r.status async for r in hidden] == [UNKNOWN]
    shown = health_pb2_grpc.HealthStub(callers["admin"]).Watch(
        health_pb2.HealthCheckRequest(service=COMPONENT), timeout=5
    )
    first = await shown.read()
    shown.cancel()
    assert first.status == SERVING


async def test_list_shows_components_to_admins_and_hides_them_from_others(callers):
    async def listed(ch: grpc.aio.Channel) -> set[str]:
        resp = await health_pb2_grpc.HealthStub(ch).List(health_pb2.HealthListRequest(), timeout=5)
        return set(resp.statuses)

    admin, peer = await listed(callers["admin"]), await listed(callers["peer-node"])
    assert {"", "yikatong.v1.Gate", COMPONENT, f"yikatong.trust.peer.{ANYUE}"} <= admin
    assert {"", "yikatong.v1.Gate"} <= peer
    assert not {n for n in peer if n.startswith("yikatong.") and not n.startswith("yikatong.v1.")}


async def test_each_loop_of_a_node_that_raises_recovers_and_health_showed_it(
    tmp_path: Path, now: datetime, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr("broker.node.server.COMPONENT_CHECK_S", 0.05)
    setups = testbed.build(tmp_path, (DAZU, ANYUE), now, cards_per_district=5, bundle_refresh_s=1)
    node = await Node.start(setups[DAZU].config)
    try:
        assert node.refresher is not None
        targets = {
            "trust-watch": (node.trust, "changed"),
            "bundle-refresh": (node.refresher, "refresh"),
            "component-checks": (node, "_check_components"),
        }
        for name, (owner, attr) in targets.items():
            original = getattr(owner, attr)
            calls = {"n": 0}

            def boom(
                *args: object, _orig=original, _calls=calls, _what=attr, **kwargs: object
            ) -> object:
                _calls["n"] += 1
                if _calls["n"] == 1:
                    raise RuntimeError(f"unexpected failure in {_what}")
                return _orig(*args, **kwargs)

            monkeypatch.setattr(owner, attr, boom)
            health = task_health_name(name)
            shown: list[int | None] = []
            deadline = time.monotonic() + 10
            while NOT_SERVING not in shown or shown[-1] != SERVING:
                assert time.monotonic() < deadline, f"{name}: {shown}"
                shown.append(node.health.status(health))
                await asyncio.sleep(0.02)
            assert node.supervisor.failures[name] == 1, name
            assert name in node.supervisor.running()
            monkeypatch.setattr(owner, attr, original)
    finally:
        await node.stop(grace=0.1)
