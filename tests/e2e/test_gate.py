"""Three districts on loopback: home, peer and cached answers, offline policy, bad input."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import datetime, timedelta

import grpc
import pytest

from broker._proto.yikatong.v1 import types_pb2
from broker.cards.entitlements import entitlements_for
from broker.cards.model import (
    CardRef,
    Entitlement,
    Scene,
    seconds_to_shanghai_midnight,
    shanghai_day,
)
from broker.node.server import Node
from broker.testbed import build as testbed
from tests.conftest import ANYUE, DAZU, RONGCHANG, Cluster
from tests.helpers import (
    check_request,
    import_lines,
    node_channel,
    recognition_stub,
    recognize_request,
    ssn_for,
)

RECOGNIZE = "/yikatong.v1.Recognition/Recognize"
ACTIVE = types_pb2.CARD_STATUS_ACTIVE
SRC = types_pb2.DecisionSource


def recognize_calls(cluster: Cluster, district: str) -> int:
    return len(cluster.nodes[district].metrics.recorder(RECOGNIZE))


def active_card(cluster: Cluster, district: str, now: datetime) -> testbed.SyntheticCard:
    today = shanghai_day(now)
    return next(
        c for c in cluster.setups[district].cards if c.status == "active" and c.valid_until >= today
    )


async def test_own_card_is_answered_from_the_registry_with_entitlements(cluster: Cluster, now):
    card = active_card(cluster, DAZU, now)
    d = await cluster.gate(DAZU).check(card.ref, Scene.BUS)
    assert d.allow and d.status == ACTIVE and d.source == SRC.DECISION_SOURCE_HOME
    expected = entitlements_for(card.birth_date, card.disabled, card.student, shanghai_day(now))
    assert list(d.entitlements) == [e.value for e in expected]
    assert recognize_calls(cluster, ANYUE) == 0 and recognize_calls(cluster, RONGCHANG) == 0


async def test_neighbours_card_goes_to_its_home_once_then_comes_from_cache(cluster: Cluster, now):
    card = active_card(cluster, ANYUE, now)
    gate = cluster.gate(DAZU)
    first = await gate.check(card.ref, Scene.SCENIC_AREA)
    second = await gate.check(card.ref, Scene.MUSEUM)
    assert first.source == SRC.DECISION_SOURCE_PEER and first.allow
    assert second.source == SRC.DECISION_SOURCE_CACHE and second.allow
    assert list(second.entitlements) == list(first.entitlements)
    assert recognize_calls(cluster, ANYUE) == 1


async def test_concurrent_checks_of_one_uncached_card_make_one_peer_call(cluster: Cluster, now):
    card = active_card(cluster, RONGCHANG, now)
    gate = cluster.gate(ANYUE)
    results = await asyncio.gather(*(gate.check(card.ref, Scene.BUS) for _ in range(30)))
    assert all(r.allow for r in results)
    assert recognize_calls(cluster, RONGCHANG) == 1


async def test_statuses_and_entitlements_of_a_neighbours_cards(cluster: Cluster, now):
    today = shanghai_day(now)
    seventy_two = f"{today.year - 72}0101"
    import_lines(
        cluster.setups[ANYUE],
        [
            f"SENIOR000001,{ssn_for(ANYUE, seventy_two)},active,true,false,2035-01-01",
            f"LOST00000001,{ssn_for(ANYUE, '19800101')},lost,false,false,2035-01-01",
            f"SUSP00000001,{ssn_for(ANYUE, '19800101')},suspended,false,false,2035-01-01",
            f"EXPD00000001,{ssn_for(ANYUE, '19800101')},active,false,false,"
            f"{(today - timedelta(days=1)).isoformat()}",
        ],
        now,
    )
    gate = cluster.gate(DAZU)
    senior = await gate.check(CardRef(ANYUE, "SENIOR000001"), Scene.BUS)
    assert senior.allow
    assert [Entitlement(e) for e in senior.entitlements] == [
        Entitlement.SENIOR_60,
        Entitlement.SENIOR_65,
        Entitlement.SENIOR_70,
        Entitlement.DISABLED,
    ]
    for number, status in [
        ("LOST00000001", types_pb2.CARD_STATUS_LOST),
        ("SUSP00000001", types_pb2.CARD_STATUS_SUSPENDED),
        ("EXPD00000001", types_pb2.CARD_STATUS_EXPIRED),
    ]:
        d = await gate.check(CardRef(ANYUE, number), Scene.BUS)
        assert (d.allow, d.status, list(d.entitlements)) == (False, status, [])
        assert d.reason and number not in d.reason


async def test_unknown_cards_are_unknown_not_errors(cluster: Cluster):
    gate = cluster.gate(DAZU)
    own = await gate.check(CardRef(DAZU, "NOSUCHCARD01"), Scene.LIBRARY)
    assert (own.allow, own.status, own.source) == (
        False,
        types_pb2.CARD_STATUS_UNKNOWN,
        SRC.DECISION_SOURCE_HOME,
    )
    peer = await gate.check(CardRef(ANYUE, "NOSUCHCARD01"), Scene.LIBRARY)
    again = await gate.check(CardRef(ANYUE, "NOSUCHCARD01"), Scene.LIBRARY)
    assert (peer.status, peer.source) == (types_pb2.CARD_STATUS_UNKNOWN, SRC.DECISION_SOURCE_PEER)
    assert again.source == SRC.DECISION_SOURCE_CACHE  # cached, briefly


async def test_a_region_without_a_peer_gets_the_offline_policy(cluster: Cluster):
    d = await cluster.gate(DAZU).check(CardRef("500118", "C500118000001"), Scene.BUS)
    assert (d.allow, d.status, d.source) == (
        False,
        types_pb2.CARD_STATUS_UNKNOWN,
        SRC.DECISION_SOURCE_OFFLINE_POLICY,
    )
    assert "500118" in d.reason


async def test_a_silent_peer_gets_the_offline_policy_and_errors_are_not_cached(
    cluster: Cluster, now
):
    card = active_card(cluster, ANYUE, now)
    await cluster.nodes[ANYUE].stop(grace=0)
    gate = cluster.gate(DAZU)
    started = time.monotonic()
    d = await gate.check(card.ref, Scene.BUS)
    assert time.monotonic() - started < 5  # bounded by the 300 ms deadline, with slack
    assert (d.allow, d.source) == (False, SRC.DECISION_SOURCE_OFFLINE_POLICY)
    assert ANYUE in d.reason
    peers = cluster.nodes[DAZU].peers
    before = peers.peer_calls
    d2 = await gate.check(card.ref, Scene.BUS)
    assert d2.source == SRC.DECISION_SOURCE_OFFLINE_POLICY
    assert peers.peer_calls == before + 1  # asked again: the failure was not cached
    cluster.nodes[ANYUE] = await Node.start(cluster.setups[ANYUE].config)
    # The peer is back: within the reconnect backoff (max 2 s) it is asked again.
    deadline = time.monotonic() + 10
    while (d3 := await gate.check(card.ref, Scene.BUS)).source != SRC.DECISION_SOURCE_PEER:
        assert d3.source == SRC.DECISION_SOURCE_OFFLINE_POLICY
        assert time.monotonic() < deadline, "peer never recognised again"
        await asyncio.sleep(0.1)
    assert d3.allow


async def test_a_peer_past_the_deadline_gets_the_offline_policy(tmp_path, now):
    # Anyue's node is a listening socket that never answers the TLS handshake.
    setups = testbed.build(tmp_path, (DAZU, ANYUE), now, cards_per_district=5, deadline_ms=200)
    writers: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.read()  # never answers; returns when the connection closes
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cfg = setups[DAZU].config
    cfg = replace(cfg, peers=(replace(cfg.peers[0], address=f"127.0.0.1:{port}"),))
    node = await Node.start(cfg)
    c = Cluster({DAZU: setups[DAZU]}, {DAZU: node})
    try:
        started = time.monotonic()
        d = await c.gate(DAZU).check(setups[ANYUE].cards[0].ref, Scene.BUS)
        assert time.monotonic() - started < 3
        assert d.source == SRC.DECISION_SOURCE_OFFLINE_POLICY and "200 ms" in d.reason
    finally:
        await c.close()
        for w in writers:
            w.close()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r.card.__setattr__("issuer_region", "5001"), "card.issuer_region"),
        (lambda r: r.card.__setattr__("card_number", "short"), "card.card_number"),
        (lambda r: r.card.__setattr__("card_number", "lower0000001"), "card.card_number"),
        (lambda r: r.ClearField("card"), "card"),
        (lambda r: r.__setattr__("scene", 0), "scene"),
        (lambda r: r.__setattr__("scene", 99), "scene"),
        (lambda r: r.__setattr__("gate_id", ""), "gate_id"),
    ],
)
async def test_malformed_checks_are_invalid_argument_naming_the_field(
    cluster: Cluster, mutate, field
):
    gate = cluster.gate(DAZU)
    request = check_request(CardRef(ANYUE, "C5120210000001"), gate.operator_id)
    mutate(request)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gate._stub.Check(request, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field + ":")


async def test_recognize_answers_only_for_own_cards_and_only_status_entitlements_ttl(
    cluster: Cluster, now
):
    ch = node_channel(cluster.nodes[ANYUE].address, cluster.setups[ANYUE], cluster.setups[DAZU])
    try:
        stub = recognition_stub(ch)
        card = active_card(cluster, ANYUE, now)
        resp = await stub.Recognize(recognize_request(card.ref), timeout=5)
        near_midnight = seconds_to_shanghai_midnight(now) < 130  # then the TTL ends at it
        assert resp.status == ACTIVE and (resp.cache_ttl_seconds == 120 or near_midnight)
        assert {f.name for f, _ in resp.ListFields()} <= {
            "status",
            "entitlements",
            "cache_ttl_seconds",
            "position",
            "max_stale_seconds",
        }
        assert resp.max_stale_seconds == 600 or near_midnight  # [recognition]'s default
        # where the home's log stood: random tokens and a count, nothing about the holder
        assert {f.name for f, _ in resp.position.ListFields()} <= {"epoch", "seq", "mark"}
        assert len(resp.position.epoch) == 32 and len(resp.position.mark) in (0, 32)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Recognize(recognize_request(CardRef(DAZU, "C5001110000001")), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("card.issuer_region:")
        unknown = await stub.Recognize(recognize_request(CardRef(ANYUE, "NOSUCH000001")), timeout=5)
        assert unknown.status == types_pb2.CARD_STATUS_UNKNOWN
        assert unknown.cache_ttl_seconds == 10 or near_midnight
    finally:
        await ch.close()


async def test_replicas_of_a_district_share_peer_answers_through_redis(tmp_path, now, redis_db):
    setups = testbed.build(tmp_path, (DAZU, ANYUE), now, cards_per_district=20, redis_url=redis_db)
    cfg = setups[DAZU].config
    nodes = {
        ANYUE: await Node.start(setups[ANYUE].config),
        "r1": await Node.start(cfg),
        "r2": await Node.start(replace(cfg, listen="127.0.0.1:0")),
    }
    c = Cluster({**setups, "r1": setups[DAZU], "r2": setups[DAZU]}, nodes)
    try:
        card = next(x for x in setups[ANYUE].cards if x.status == "active")
        first = await c.gate("r1").check(card.ref, Scene.BUS)
        second = await c.gate("r2").check(card.ref, Scene.BUS)
        assert first.source == SRC.DECISION_SOURCE_PEER
        assert second.source == SRC.DECISION_SOURCE_CACHE
        assert list(second.entitlements) == list(first.entitlements)
        assert len(nodes[ANYUE].metrics.recorder(RECOGNIZE)) == 1
        assert nodes["r2"].peers.peer_calls == 0
    finally:
        await c.close()


async def test_same_city_treatment_a_neighbours_senior_pays_what_a_local_senior_pays(
    cluster: Cluster, now
):
    today = shanghai_day(now)
    born = f"{today.year - 66}0101"
    import_lines(
        cluster.setups[ANYUE],
        [f"SENIOR660001,{ssn_for(ANYUE, born)},active,false,false,2035-01-01"],
        now,
    )
    import_lines(
        cluster.setups[DAZU],
        [
            f"SENIOR660002,{ssn_for(DAZU, born)},active,false,false,2035-01-01",
            f"ADULT0000001,{ssn_for(DAZU, '19900101')},active,false,false,2035-01-01",
        ],
        now,
    )
    gate = cluster.gate(DAZU)
    visitor = await gate.check(CardRef(ANYUE, "SENIOR660001"), Scene.BUS)
    local = await gate.check(CardRef(DAZU, "SENIOR660002"), Scene.BUS)
    for d in (visitor, local):
        assert (d.gross_fare_fen, d.charged_fen, d.concession_fen) == (200, 0, 200)
        assert (
            Entitlement(d.applied_entitlement) is Entitlement.SENIOR_65
            and d.fare_version == "sample-1"
        )
    adult = await gate.check(CardRef(DAZU, "ADULT0000001"), Scene.SCENIC_AREA)
    assert (adult.gross_fare_fen, adult.charged_fen, adult.concession_fen) == (11500, 11500, 0)
    assert adult.applied_entitlement == 0
    scenic = await gate.check(CardRef(ANYUE, "SENIOR660001"), Scene.SCENIC_AREA)
    assert (scenic.charged_fen, scenic.concession_fen) == (5750, 5750)  # senior_60: half
    refused = await gate.check(CardRef(ANYUE, "NOSUCHCARD02"), Scene.BUS)
    assert (refused.allow, refused.gross_fare_fen, refused.fare_version) == (False, 0, "")
