"""Mutual-TLS channels to peers: one per peer, checking its name and CA, renewed with trust.

Module under test: :mod:`broker.peers.channels`. Peers are ``grpc.aio`` servers on loopback
(tests/peers/support.py) that note each caller's certificate and requested server name.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import grpc
import pytest

from broker._proto.yikatong.v1 import recognition_pb2, recognition_pb2_grpc
from broker.peers.channels import PeerChannels
from broker.trust import pki
from broker.trust.config import node_server_name
from broker.trust.identity import node_identity
from broker.trust.store import TrustStore
from tests.peers.support import (
    HOME,
    OTHER,
    PEER,
    District,
    PeerServer,
    Settings,
    home_settings,
    renew_home_node,
)


async def ask(channel: grpc.aio.Channel) -> None:
    stub = recognition_pb2_grpc.RecognitionStub(channel)
    await stub.Recognize(recognition_pb2.RecognizeRequest(), timeout=5)


@dataclass
class Net:
    now: datetime
    home: District
    settings: Settings
    store: TrustStore
    channels: PeerChannels
    servers: dict[str, PeerServer]


@pytest.fixture
async def net(tmp_path: Path, now: datetime) -> AsyncIterator[Net]:
    """Home with two peers, each served by its own real node certificate."""
    home = District.make(HOME, now)
    peers = {code: District.make(code, now) for code in (PEER, OTHER)}
    servers = {code: await PeerServer.start(d.node, home.ca) for code, d in peers.items()}
    settings = home_settings(
        tmp_path, home, {code: (peers[code], servers[code].address) for code in peers}
    )
    store = TrustStore(settings)
    channels = PeerChannels(store, settings.peers)
    try:
        yield Net(now, home, settings, store, channels, servers)
    finally:
        await channels.close()
        for server in servers.values():
            await server.stop()


async def lone_peer(
    tmp_path: Path,
    now: datetime,
    peer: District,
    serving: pki.KeyPair,
    server_name: str | None = None,
) -> tuple[PeerChannels, PeerServer]:
    """Home trusting ``peer`` (its CA, ``server_name``) at an address served with ``serving``."""
    home = District.make(HOME, now)
    server = await PeerServer.start(serving, home.ca)
    names = {PEER: server_name} if server_name else None
    settings = home_settings(tmp_path, home, {PEER: (peer, server.address)}, server_names=names)
    return PeerChannels(TrustStore(settings), settings.peers), server


async def refused(channels: PeerChannels, server: PeerServer) -> None:
    """The handshake fails: the call is UNAVAILABLE and never reaches the server's code."""
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ask(channels.channel(PEER))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.recognition.requests == []
    finally:
        await channels.close()
        await server.stop()


# ----------------------------------------------------------------------------- one per peer


async def test_each_peer_has_one_channel_reused_across_calls(net: Net):
    a = net.channels.channel(PEER)
    assert net.channels.channel(PEER) is a
    b = net.channels.channel(OTHER)
    assert b is not a
    await ask(a)
    await ask(b)
    assert len(net.servers[PEER].recognition.requests) == 1
    assert len(net.servers[OTHER].recognition.requests) == 1


async def test_a_channel_asks_for_the_peers_server_name_and_presents_this_nodes_certificate(
    net: Net,
):
    await ask(net.channels.channel(PEER))
    (auth,) = net.servers[PEER].recognition.auth
    assert auth["ssl_requested_server_name"] == [node_server_name(PEER).encode()]
    assert auth["x509_pem_cert"] == [net.settings.tls.cert_file.read_bytes()]


def test_an_unknown_district_is_refused_and_gets_no_channel(net: Net):
    assert net.channels.configured(PEER) and net.channels.configured(OTHER)
    for district in (HOME, "500118", ""):
        assert not net.channels.configured(district)
        with pytest.raises(KeyError):
            net.channels.channel(district)


# ----------------------------------------------------------------------------- whom it trusts


async def test_a_node_of_another_district_cannot_pass_for_the_peer(tmp_path: Path, now: datetime):
    """The channel to PEER trusts only PEER's CA: OTHER's genuine node certificate is refused."""
    peer, other = District.make(PEER, now), District.make(OTHER, now)
    await refused(*await lone_peer(tmp_path, now, peer, other.node))


async def test_a_certificate_of_the_peers_ca_for_another_name_is_refused(
    tmp_path: Path, now: datetime
):
    """Chaining to the right CA is not enough: the certificate must name the peer's node."""
    peer = District.make(PEER, now)
    wrong_name = pki.issue(peer.ca, node_identity(OTHER), now)
    await refused(*await lone_peer(tmp_path, now, peer, wrong_name))


async def test_the_configured_server_name_is_the_one_checked(tmp_path: Path, now: datetime):
    """The peer's genuine certificate is refused if the configured server_name is another."""
    peer = District.make(PEER, now)
    await refused(*await lone_peer(tmp_path, now, peer, peer.node, "node.peer.example"))


async def test_the_peers_genuine_certificate_is_accepted(tmp_path: Path, now: datetime):
    """The control for the three refusals above: same set-up, the right certificate."""
    peer = District.make(PEER, now)
    channels, server = await lone_peer(tmp_path, now, peer, peer.node)
    try:
        await ask(channels.channel(PEER))
        assert len(server.recognition.requests) == 1
    finally:
        await channels.close()
        await server.stop()


# ----------------------------------------------------------------------------- renewal


async def test_channels_are_kept_while_the_trust_generation_stays(net: Net):
    a = net.channels.channel(PEER)
    assert net.store.reload() is False  # nothing changed on disk
    assert net.channels.channel(PEER) is a


async def test_a_new_generation_gives_new_channels_with_the_new_certificate(net: Net):
    old, old_other = net.channels.channel(PEER), net.channels.channel(OTHER)
    await ask(old)
    renewed = renew_home_node(net.settings, net.home, net.now)
    assert net.store.reload()
    new = net.channels.channel(PEER)
    assert new is not old
    assert net.channels.channel(OTHER) is not old_other  # every peer's channel is renewed
    await ask(new)
    seen = [a["x509_pem_cert"][0] for a in net.servers[PEER].recognition.auth]
    assert seen == [net.home.node.cert_pem(), renewed.cert_pem()]


async def test_a_retired_channel_drains_its_calls_in_flight_then_closes(net: Net):
    old = net.channels.channel(PEER)
    await ask(old)  # connected
    peer = net.servers[PEER].recognition
    peer.delay = 0.3
    peer.arrived.clear()
    in_flight = asyncio.create_task(ask(old))
    await asyncio.wait_for(peer.arrived.wait(), 5)  # the call is at the peer now
    renew_home_node(net.settings, net.home, net.now)
    assert net.store.reload()
    assert net.channels.channel(PEER) is not old
    await in_flight  # finishes on the old channel instead of being cut off
    await net.channels.close()  # waits for the draining channels too
    assert old.get_state() == grpc.ChannelConnectivity.SHUTDOWN


async def test_close_shuts_every_channel_and_a_later_call_opens_a_fresh_one(net: Net):
    a, b = net.channels.channel(PEER), net.channels.channel(OTHER)
    await net.channels.close()
    assert a.get_state() == grpc.ChannelConnectivity.SHUTDOWN
    assert b.get_state() == grpc.ChannelConnectivity.SHUTDOWN
    fresh = net.channels.channel(PEER)
    assert fresh is not a
    await ask(fresh)


# ----------------------------------------------------------------------------- pinned names


async def test_a_bundle_pinning_a_new_epoch_closes_the_old_channel_at_once(
    tmp_path: Path, now: datetime
):
    """A call in flight on the old name is cut, not drained: the old name may be a thief's."""
    from broker.trust.bundle import Bundle, issued_now, sign
    from broker.trust.config import node_epoch_name

    home = District.make(HOME, now)
    peer = District.make(PEER, now)
    e1, e2 = node_epoch_name(PEER, 1), node_epoch_name(PEER, 2)
    serving = pki.issue(peer.ca, node_identity(PEER), now, extra_dns=(e1, e2))
    server = await PeerServer.start(serving, home.ca)
    settings = home_settings(tmp_path, home, {PEER: (peer, server.address)}, bundles=True)
    bundle_file = settings.peers[0].bundle_file
    assert bundle_file is not None

    def publish(sequence: int, name: str) -> None:
        crl = pki.crl_pem(pki.build_crl(peer.ca, [], sequence, now)).decode()
        draft = Bundle(
            PEER, sequence, issued_now(now), (peer.ca.cert_pem().decode(),), (crl,), (), name
        )
        pki.write_public(bundle_file, sign(draft, peer.ca).to_json())

    publish(1, e1)
    store = TrustStore(settings)
    channels = PeerChannels(store, settings.peers)
    try:
        await ask(channels.channel(PEER))
        assert server.recognition.auth[-1]["ssl_requested_server_name"] == [e1.encode()]
        server.recognition.delay = 3.0

        # Same name, new generation (a later bundle): the call in flight is drained.
        drained = asyncio.ensure_future(ask(channels.channel(PEER)))
        await server.recognition.arrived.wait()
        server.recognition.arrived.clear()
        publish(2, e1)
        assert store.reload()
        channels.channel(PEER)
        await asyncio.wait_for(drained, timeout=5)  # it completes

        # A new pinned name: the call in flight on the old one ends now, not in 3 s.
        cut = asyncio.ensure_future(ask(channels.channel(PEER)))
        await server.recognition.arrived.wait()
        publish(3, e2)
        assert store.reload()
        started = asyncio.get_running_loop().time()
        channels.channel(PEER)
        # grpc.aio ends a call on a channel closed without grace by cancelling it.
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(cut, timeout=5)
        assert cut.cancelled()
        assert asyncio.get_running_loop().time() - started < 1.5
        server.recognition.delay = 0.0
        await ask(channels.channel(PEER))
        assert server.recognition.auth[-1]["ssl_requested_server_name"] == [e2.encode()]
    finally:
        await channels.close()
        await server.stop()
