"""Mutual TLS and access rights: who may call what, refused by real handshakes and checks."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from broker import pki
from broker.cards import CardRef, Scene
from broker.identity import node_identity, operator_identity
from tests.conftest import ANYUE, DAZU, RONGCHANG, Cluster
from tests.helpers import (
    caller_channel,
    channel,
    check_request,
    gate_stub,
    node_channel,
    recognition_stub,
    recognize_request,
)

CARD = CardRef(DAZU, "C5001110000001")
GATE = "/yikatong.v1.Gate/Check"


def calls_handled(cluster: Cluster, district: str, method: str = GATE) -> int:
    return len(cluster.nodes[district].metrics.recorder(method))


async def expect_refused_handshake(cluster: Cluster, ch: grpc.aio.Channel) -> None:
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gate_stub(ch).Check(check_request(CARD, "transit-01"), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await ch.close()
    assert calls_handled(cluster, DAZU) == 0  # no call reached the node's handlers


async def test_no_client_certificate_no_call(cluster: Cluster):
    s = cluster.setups[DAZU]
    ch = channel(cluster.nodes[DAZU].address, DAZU, s.paths.ca_cert.read_bytes())
    await expect_refused_handshake(cluster, ch)


async def test_a_certificate_from_an_unknown_ca_no_call(cluster: Cluster, now):
    rogue = pki.create_ca(DAZU, now)  # names Dazu, but nobody trusts it
    ch = caller_channel(
        cluster.nodes[DAZU].address,
        cluster.setups[DAZU],
        rogue,
        operator_identity(DAZU, "transit-01"),
        now,
    )
    await expect_refused_handshake(cluster, ch)


async def test_an_expired_certificate_no_call(cluster: Cluster, now):
    s = cluster.setups[DAZU]
    ca = pki.load(s.paths.ca_cert, s.paths.ca_key)
    ch = caller_channel(
        cluster.nodes[DAZU].address,
        s,
        ca,
        operator_identity(DAZU, "transit-01"),
        now - timedelta(days=3),
        days=1,
    )
    await expect_refused_handshake(cluster, ch)


async def test_a_neighbours_ca_cannot_vouch_for_our_operator(cluster: Cluster, now):
    anyue_ca = pki.load(cluster.setups[ANYUE].paths.ca_cert, cluster.setups[ANYUE].paths.ca_key)
    ch = caller_channel(
        cluster.nodes[DAZU].address,
        cluster.setups[DAZU],
        anyue_ca,
        operator_identity(DAZU, "transit-01"),
        now,
    )
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gate_stub(ch).Check(check_request(CARD, "transit-01"), timeout=5)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "not issued by its CA" in info.value.details()
    finally:
        await ch.close()


async def test_a_neighbours_ca_cannot_vouch_for_a_third_districts_node(cluster: Cluster, now):
    anyue_ca = pki.load(cluster.setups[ANYUE].paths.ca_cert, cluster.setups[ANYUE].paths.ca_key)
    ch = caller_channel(
        cluster.nodes[DAZU].address, cluster.setups[DAZU], anyue_ca, node_identity(RONGCHANG), now
    )
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await recognition_stub(ch).Recognize(recognize_request(CARD), timeout=5)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await ch.close()


async def test_an_operator_may_not_call_recognize(cluster: Cluster):
    s = cluster.setups[DAZU]
    ch = channel(
        cluster.nodes[DAZU].address,
        DAZU,
        s.paths.ca_cert.read_bytes(),
        s.operator_cert.read_bytes(),
        s.operator_key.read_bytes(),
    )
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await recognition_stub(ch).Recognize(recognize_request(CARD), timeout=5)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "peer district nodes only" in info.value.details()
    finally:
        await ch.close()


async def test_a_peer_node_may_not_call_the_gate(cluster: Cluster):
    ch = node_channel(cluster.nodes[DAZU].address, cluster.setups[DAZU], cluster.setups[ANYUE])
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gate_stub(ch).Check(check_request(CARD, ""), timeout=5)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await ch.close()
    assert calls_handled(cluster, DAZU) == 1  # reached the interceptor, refused there


async def test_a_neighbours_operator_may_not_use_our_gate(cluster: Cluster):
    a = cluster.setups[ANYUE]
    ch = channel(
        cluster.nodes[DAZU].address,
        DAZU,
        cluster.setups[DAZU].paths.ca_cert.read_bytes(),
        a.operator_cert.read_bytes(),
        a.operator_key.read_bytes(),
    )
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gate_stub(ch).Check(check_request(CARD, a.operator_id), timeout=5)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert ANYUE in info.value.details()
    finally:
        await ch.close()


async def test_operator_id_must_equal_the_certificates(cluster: Cluster):
    gate = cluster.gate(DAZU, operator_id="someone-else")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gate.check(CARD, Scene.BUS)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "operator_id" in info.value.details()


async def test_health_and_reflection_open_to_any_authenticated_caller(cluster: Cluster):
    s = cluster.setups[DAZU]
    callers = [
        channel(
            cluster.nodes[DAZU].address,
            DAZU,
            s.paths.ca_cert.read_bytes(),
            s.operator_cert.read_bytes(),
            s.operator_key.read_bytes(),
        ),
        node_channel(cluster.nodes[DAZU].address, s, cluster.setups[ANYUE]),
    ]
    try:
        for ch in callers:
            health = health_pb2_grpc.HealthStub(ch)
            for service in ("", "yikatong.v1.Gate", "yikatong.v1.Recognition"):
                resp = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            responses = [
                r
                async for r in refl.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
                )
            ]
            names = {svc.name for svc in responses[0].list_services_response.service}
            assert {"yikatong.v1.Gate", "yikatong.v1.Recognition", "grpc.health.v1.Health"} <= names
    finally:
        for ch in callers:
            await ch.close()
