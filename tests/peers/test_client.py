"""Asking a peer district about one of its cards: the answer, or PeerUnavailable naming the peer.

Module under test: :mod:`broker.peers.client`. The peer is a ``grpc.aio`` server on loopback
(tests/peers/support.py) holding the peer district's real node certificate, so every call goes
through the same mutual-TLS channel a node uses.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import grpc
import pytest

from broker._proto.yikatong.v1 import recognition_pb2, types_pb2
from broker.cards.model import CardRef, CardStatus, Entitlement, Recognition, Scene
from broker.core.breaker import PROBE_S, THRESHOLD, State
from broker.core.errors import PeerUnavailable
from broker.node.fields import is_trace_id
from broker.peers.channels import PeerChannels
from broker.peers.client import PeerClient, trace_id
from broker.trust.store import TrustStore
from tests.peers.support import HOME, OTHER, PEER, District, PeerServer, free_address, home_settings

CARD = CardRef(PEER, "C5120210000001")
DEADLINE_MS = 200
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@dataclass
class Net:
    server: PeerServer
    channels: PeerChannels
    client: PeerClient


@pytest.fixture
async def net(tmp_path: Path, now: datetime) -> AsyncIterator[Net]:
    home, peer = District.make(HOME, now), District.make(PEER, now)
    server = await PeerServer.start(peer.node, home.ca)
    settings = home_settings(tmp_path, home, {PEER: (peer, server.address)})
    channels = PeerChannels(TrustStore(settings), settings.peers)
    # The handshake is done here, so that a busy machine does not spend the tests' 200 ms on it.
    await asyncio.wait_for(channels.channel(PEER).channel_ready(), 10)
    try:
        yield Net(server, channels, PeerClient(channels, DEADLINE_MS))
    finally:
        await channels.close()
        await server.stop()


def answer(status: int, *entitlements: int, ttl: int = 0) -> recognition_pb2.RecognizeResponse:
    return recognition_pb2.RecognizeResponse(
        status=status,  # type: ignore[arg-type]
        entitlements=list(entitlements),  # type: ignore[arg-type]
        cache_ttl_seconds=ttl,
    )


async def test_a_peers_answer_becomes_a_recognition(net: Net):
    net.server.recognition.answer = answer(
        types_pb2.CARD_STATUS_ACTIVE,
        types_pb2.ENTITLEMENT_SENIOR_65,
        types_pb2.ENTITLEMENT_DISABLED,
        ttl=90,
    )
    got = await net.client.recognize(CARD, Scene.SCENIC_AREA, "req-7")
    assert got == Recognition(CardStatus.ACTIVE, (Entitlement.SENIOR_65, Entitlement.DISABLED), 90)


async def test_the_request_carries_the_card_scene_and_a_trace_id_passed_through(net: Net):
    net.server.recognition.answer = answer(types_pb2.CARD_STATUS_LOST)
    await net.client.recognize(CARD, Scene.MUSEUM, TRACE_ID)
    (seen,) = net.server.recognition.requests
    assert (seen.card.issuer_region, seen.card.card_number) == (
        CARD.issuer_region,
        CARD.card_number,
    )
    assert seen.scene == types_pb2.SCENE_MUSEUM
    assert seen.request_id == TRACE_ID


async def test_a_request_id_that_is_not_a_trace_id_is_sent_as_a_new_trace_id(net: Net):
    """The peer would replace it anyway; a gate's own id stays in this district."""
    net.server.recognition.answer = answer(types_pb2.CARD_STATUS_LOST)
    not_trace_ids = ["", "req-42", TRACE_ID.upper(), "0" * 32, TRACE_ID + "0", "a0b1c2d3e4f5a6b7"]
    for request_id in not_trace_ids:
        await net.client.recognize(CARD, Scene.BUS, request_id)
    sent = [r.request_id for r in net.server.recognition.requests]
    assert all(is_trace_id(r) for r in sent), sent
    assert len(set(sent)) == len(sent)  # a new one for every call
    assert not set(sent) & set(not_trace_ids)


@pytest.mark.parametrize("value", [TRACE_ID, "", "req-42", "0" * 32, "F" * 32, "f" * 33])
def test_trace_id_agrees_with_the_serving_sides_check(value: str):
    """broker.peers may not import broker.node: its copy of the format must not drift."""
    sent = trace_id(value)
    assert is_trace_id(sent)
    assert (sent == value) is is_trace_id(value)


async def test_the_answer_is_read_defensively(net: Net):
    """An unknown status is UNKNOWN, and a card that is not active carries no entitlements."""
    net.server.recognition.answer = answer(99, types_pb2.ENTITLEMENT_STUDENT, ttl=5)
    assert await net.client.recognize(CARD, Scene.BUS, "r") == Recognition(
        CardStatus.UNKNOWN, (), 5
    )
    net.server.recognition.answer = answer(
        types_pb2.CARD_STATUS_SUSPENDED, types_pb2.ENTITLEMENT_STUDENT
    )
    got = await net.client.recognize(CARD, Scene.BUS, "r")
    assert got.status is CardStatus.SUSPENDED and got.entitlements == ()


async def test_a_peer_slower_than_the_deadline_is_unavailable_within_it(net: Net):
    net.server.recognition.delay = 10.0
    started = time.monotonic()
    with pytest.raises(PeerUnavailable) as caught:
        await net.client.recognize(CARD, Scene.BUS, "r")
    elapsed = time.monotonic() - started
    assert caught.value.district == PEER
    assert caught.value.reason == f"did not answer within {DEADLINE_MS} ms"
    assert str(caught.value).startswith(f"district {PEER}:")
    assert elapsed < 5.0  # the deadline cut the call short, not the peer's 10 s answer
    assert isinstance(caught.value.__cause__, grpc.aio.AioRpcError)


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ],
)
async def test_a_peer_answering_an_error_status_is_unavailable(net: Net, code: grpc.StatusCode):
    net.server.recognition.abort = code
    with pytest.raises(PeerUnavailable) as caught:
        await net.client.recognize(CARD, Scene.BUS, "r")
    assert caught.value.district == PEER
    assert caught.value.reason == f"answered {code.name}"


async def test_a_peer_nobody_answers_for_is_unavailable(tmp_path: Path, now: datetime):
    home, peer = District.make(HOME, now), District.make(PEER, now)
    settings = home_settings(tmp_path, home, {PEER: (peer, free_address())})
    channels = PeerChannels(TrustStore(settings), settings.peers)
    client = PeerClient(channels, DEADLINE_MS)
    try:
        started = time.monotonic()
        with pytest.raises(PeerUnavailable) as caught:
            await client.recognize(CARD, Scene.BUS, "r")
        assert time.monotonic() - started < 2.0
    finally:
        await channels.close()
    assert caught.value.district == PEER
    assert caught.value.reason.startswith(("answered UNAVAILABLE", "did not answer within"))


async def test_a_peer_that_comes_back_is_asked_again(net: Net):
    """One failure does not open the breaker: the next call on the same client succeeds."""
    net.server.recognition.abort = grpc.StatusCode.UNAVAILABLE
    with pytest.raises(PeerUnavailable):
        await net.client.recognize(CARD, Scene.BUS, "r")
    net.server.recognition.abort = None
    net.server.recognition.answer = answer(types_pb2.CARD_STATUS_EXPIRED, ttl=3)
    got = await net.client.recognize(CARD, Scene.BUS, "r")
    assert got == Recognition(CardStatus.EXPIRED, (), 3)


def test_configured_reports_only_the_configured_peers(net: Net):
    assert net.client.configured(PEER)
    assert not net.client.configured(HOME)  # its own district is not a peer
    assert not net.client.configured(OTHER)
    assert net.client.deadline_ms == DEADLINE_MS


async def test_a_frozen_peer_is_skipped_at_once_after_three_timeouts_then_probed(net: Net):
    """Three calls wait out the deadline; the next ones are refused at once, without a call;
    half a second on, one probe goes, and its success puts the peer back in use."""
    net.server.recognition.delay = 10.0  # frozen
    for _ in range(THRESHOLD):
        with pytest.raises(PeerUnavailable, match="did not answer within"):
            await net.client.recognize(CARD, Scene.BUS, "r")
    asked = len(net.server.recognition.requests)
    started = time.monotonic()
    for _ in range(20):
        with pytest.raises(PeerUnavailable, match="not asked: it failed") as caught:
            await net.client.recognize(CARD, Scene.BUS, "r")
    assert time.monotonic() - started < DEADLINE_MS / 1000  # 20 refusals, none waited
    assert caught.value.district == PEER
    assert len(net.server.recognition.requests) == asked  # nothing was sent
    assert net.client.breaker(PEER).state is State.OPEN
    net.server.recognition.delay = 0.0  # back
    net.server.recognition.answer = answer(types_pb2.CARD_STATUS_ACTIVE, ttl=3)
    await asyncio.sleep(PROBE_S)
    got = await net.client.recognize(CARD, Scene.BUS, "r")  # the probe
    assert got.status is CardStatus.ACTIVE
    assert net.client.breaker(PEER).state is State.CLOSED
    assert (await net.client.recognize(CARD, Scene.BUS, "r")).status is CardStatus.ACTIVE


async def test_a_failed_probe_keeps_the_peer_skipped_for_another_half_second(net: Net):
    net.server.recognition.abort = grpc.StatusCode.UNAVAILABLE
    for _ in range(THRESHOLD):
        with pytest.raises(PeerUnavailable, match="answered UNAVAILABLE"):
            await net.client.recognize(CARD, Scene.BUS, "r")
    await asyncio.sleep(PROBE_S)
    with pytest.raises(PeerUnavailable, match="answered UNAVAILABLE"):  # the probe, failed
        await net.client.recognize(CARD, Scene.BUS, "r")
    with pytest.raises(PeerUnavailable, match="not asked"):
        await net.client.recognize(CARD, Scene.BUS, "r")
    assert net.client.breaker(PEER).state is State.OPEN
