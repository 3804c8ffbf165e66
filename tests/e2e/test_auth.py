"""Mutual TLS and access rights: who may call what, refused by real handshakes and checks."""

from __future__ import annotations

import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import tomli_w
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from broker._proto.yikatong.v1 import settlement_pb2, settlement_pb2_grpc, types_pb2
from broker.cards.model import CardRef, Scene
from broker.node.config import load_config
from broker.node.server import Node
from broker.testbed.build import DistrictSetup
from broker.trust import certops, pki
from broker.trust.access import OPERATOR_METHODS
from broker.trust.identity import node_identity, operator_identity
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


def check(ch: grpc.aio.Channel, operator_id: str = "transit-01") -> Any:
    return gate_stub(ch).Check(check_request(CARD, operator_id), timeout=5)


def recognize(ch: grpc.aio.Channel) -> Any:
    return recognition_stub(ch).Recognize(recognize_request(CARD), timeout=5)


async def call_error(
    ch: grpc.aio.Channel, call: Callable[[grpc.aio.Channel], Awaitable[Any]]
) -> grpc.aio.AioRpcError:
    """Make one call that must fail, close the channel, return the error."""
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(ch)
        return info.value
    finally:
        await ch.close()


def calls_handled(cluster: Cluster, district: str = DAZU) -> int:
    return len(cluster.nodes[district].metrics.recorder(GATE))


async def expect_refused_handshake(cluster: Cluster, ch: grpc.aio.Channel) -> None:
    err = await call_error(ch, check)
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert calls_handled(cluster) == 0  # no call reached the node's handlers


def dazu_operator_channel(cluster: Cluster) -> grpc.aio.Channel:
    s = cluster.setups[DAZU]
    return channel(
        cluster.nodes[DAZU].address,
        DAZU,
        s.paths.ca_cert.read_bytes(),
        s.operator_cert.read_bytes(),
        s.operator_key.read_bytes(),
    )


def ca_of(cluster: Cluster, district: str) -> pki.KeyPair:
    paths = cluster.setups[district].paths
    return certops.active_ca(paths)


async def test_no_client_certificate_no_call(cluster: Cluster):
    s = cluster.setups[DAZU]
    ch = channel(cluster.nodes[DAZU].address, DAZU, s.paths.ca_cert.read_bytes())
    await expect_refused_handshake(cluster, ch)


async def test_a_certificate_from_an_unknown_ca_no_call(cluster: Cluster, now):
    rogue = pki.create_ca(DAZU, now)  # names Dazu, but nobody trusts it
    ident = operator_identity(DAZU, "transit-01")
    ch = caller_channel(cluster.nodes[DAZU].address, cluster.setups[DAZU], rogue, ident, now)
    await expect_refused_handshake(cluster, ch)


async def test_an_expired_certificate_no_call(cluster: Cluster, now):
    ident = operator_identity(DAZU, "transit-01")
    issued = now - timedelta(days=3)  # valid for one day, two days ago
    ch = caller_channel(
        cluster.nodes[DAZU].address, cluster.setups[DAZU], ca_of(cluster, DAZU), ident, issued, 1
    )
    await expect_refused_handshake(cluster, ch)


async def test_a_neighbours_ca_cannot_vouch_for_our_operator(cluster: Cluster, now):
    ident = operator_identity(DAZU, "transit-01")
    ch = caller_channel(
        cluster.nodes[DAZU].address, cluster.setups[DAZU], ca_of(cluster, ANYUE), ident, now
    )
    err = await call_error(ch, check)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not issued by its CA" in err.details()


async def test_a_neighbours_ca_cannot_vouch_for_a_third_districts_node(cluster: Cluster, now):
    ident = node_identity(RONGCHANG)
    ch = caller_channel(
        cluster.nodes[DAZU].address, cluster.setups[DAZU], ca_of(cluster, ANYUE), ident, now
    )
    err = await call_error(ch, recognize)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_an_operator_may_not_call_recognize(cluster: Cluster):
    err = await call_error(dazu_operator_channel(cluster), recognize)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "is for nodes of configured peer districts" in err.details()


async def test_a_peer_node_may_not_call_the_gate(cluster: Cluster):
    ch = node_channel(cluster.nodes[DAZU].address, cluster.setups[DAZU], cluster.setups[ANYUE])
    err = await call_error(ch, lambda c: check(c, operator_id=""))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert calls_handled(cluster) == 1  # reached the interceptor, refused there


async def test_a_neighbours_operator_may_not_use_our_gate(cluster: Cluster):
    a = cluster.setups[ANYUE]
    ch = channel(
        cluster.nodes[DAZU].address,
        DAZU,
        cluster.setups[DAZU].paths.ca_cert.read_bytes(),
        a.operator_cert.read_bytes(),
        a.operator_key.read_bytes(),
    )
    err = await call_error(ch, lambda c: check(c, operator_id=a.operator_id))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert ANYUE in err.details()


async def test_operator_id_must_equal_the_certificates(cluster: Cluster):
    gate = cluster.gate(DAZU, operator_id="someone-else")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gate.check(CARD, Scene.BUS)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "operator_id" in info.value.details()


async def test_health_and_reflection_open_to_any_authenticated_caller(cluster: Cluster):
    callers = [
        dazu_operator_channel(cluster),
        node_channel(cluster.nodes[DAZU].address, cluster.setups[DAZU], cluster.setups[ANYUE]),
    ]
    try:
        for ch in callers:
            health = health_pb2_grpc.HealthStub(ch)
            for service in ("", "yikatong.v1.Gate", "yikatong.v1.Recognition"):
                resp = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            responses = [r async for r in refl.ServerReflectionInfo(iter([request]), timeout=5)]
            names = {svc.name for svc in responses[0].list_services_response.service}
            assert {"yikatong.v1.Gate", "yikatong.v1.Recognition", "grpc.health.v1.Health"} <= names
    finally:
        for ch in callers:
            await ch.close()


# Rules an operator of Dazu might write that also match Anyue's operator of the same id.
WIDE_GRANTS = ["any", "spiffe://*.yikatong.cy/operator/transit-01"]


@pytest.fixture(params=WIDE_GRANTS)
async def wide_cluster(
    request: pytest.FixtureRequest, districts: dict[str, DistrictSetup], tmp_path: Path
) -> AsyncIterator[Cluster]:
    """The three districts, Dazu's node.toml granting its operator methods to ``param`` too."""
    dazu = districts[DAZU]
    doc = tomllib.loads(dazu.config_path.read_text())
    doc.setdefault("access", {}).update(
        {key: ["own-operators", request.param] for key in OPERATOR_METHODS}
    )
    wide = tmp_path / "dazu-wide.toml"
    wide.write_text(tomli_w.dumps(doc))
    setups = {**districts, DAZU: replace(dazu, config=load_config(wide, env={}))}
    nodes = {code: await Node.start(s.config) for code, s in setups.items()}
    c = Cluster(setups, nodes)
    try:
        yield c
    finally:
        await c.close()


def operator_of(cluster: Cluster, district: str) -> grpc.aio.Channel:
    """A channel to Dazu's node presenting ``district``'s operator certificate (transit-01)."""
    s = cluster.setups[district]
    return channel(
        cluster.nodes[DAZU].address,
        DAZU,
        cluster.setups[DAZU].paths.ca_cert.read_bytes(),
        s.operator_cert.read_bytes(),
        s.operator_key.read_bytes(),
    )


def a_trip(trip_id: str, now: datetime) -> settlement_pb2.TripRecord:
    ts = Timestamp()
    ts.FromDatetime(now - timedelta(minutes=3))
    return settlement_pb2.TripRecord(
        operator_id="transit-01",
        trip_id=trip_id,
        card=types_pb2.CardRef(issuer_region=ANYUE, card_number="C5120210000001"),
        scene=types_pb2.SCENE_BUS,
        occurred_at=ts,
        gross_fare_fen=200,
        charged_fen=200,
        fare_version="sample-1",
    )


def operator_calls(now: datetime) -> dict[str, Callable[[grpc.aio.Channel], Awaitable[Any]]]:
    """One call of each method that acts for operator transit-01, by method name."""

    def stub(ch: grpc.aio.Channel) -> settlement_pb2_grpc.SettlementStub:
        return settlement_pb2_grpc.SettlementStub(ch)

    day = now.date().isoformat()
    return {
        "yikatong.v1.Gate/Check": check,
        "yikatong.v1.Settlement/SubmitTrips": lambda ch: stub(ch).SubmitTrips(
            settlement_pb2.SubmitTripsRequest(trips=[a_trip("x-1", now)]), timeout=5
        ),
        "yikatong.v1.Settlement/GetTripOutcomes": lambda ch: stub(ch).GetTripOutcomes(
            settlement_pb2.GetTripOutcomesRequest(operator_id="transit-01", trip_ids=["x-1"]),
            timeout=5,
        ),
        "yikatong.v1.Settlement/GetStatement": lambda ch: stub(ch).GetStatement(
            settlement_pb2.GetStatementRequest(operator_id="transit-01", period=day), timeout=5
        ),
    }


async def test_a_neighbours_same_named_operator_is_refused_every_operator_method(
    wide_cluster: Cluster, now: datetime
):
    """Anyue's transit-01 may not check gates, submit trips or read statements as Dazu's.

    Whatever Dazu's ``[access]`` grants: ``"any"``, or a pattern that matches both.
    """
    for name, call in operator_calls(now).items():
        err = await call_error(operator_of(wide_cluster, ANYUE), call)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, name
        assert err.details() == (
            f"operator of district {ANYUE} may not call {name} on district {DAZU}'s node"
            f" ({operator_identity(ANYUE, 'transit-01').spiffe_id})"
        )
    ours = operator_of(wide_cluster, DAZU)
    try:
        outcomes = await operator_calls(now)["yikatong.v1.Settlement/GetTripOutcomes"](ours)
        assert [r.outcome for r in outcomes.results] == [settlement_pb2.TRIP_OUTCOME_UNKNOWN]
    finally:
        await ours.close()


async def test_our_own_operator_still_may_call_every_operator_method_under_wide_access(
    wide_cluster: Cluster, now: datetime
):
    ours = operator_of(wide_cluster, DAZU)
    try:
        answers = {name: await call(ours) for name, call in operator_calls(now).items()}
    finally:
        await ours.close()
    submitted = answers["yikatong.v1.Settlement/SubmitTrips"].results
    assert [r.outcome for r in submitted] == [settlement_pb2.TRIP_OUTCOME_ACCEPTED]
    assert answers["yikatong.v1.Settlement/GetStatement"].operator_id == "transit-01"
