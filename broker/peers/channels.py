"""Mutual-TLS channels to peer district nodes, one per peer, renewed when trust changes.

A gRPC client cannot swap its certificate on an open channel, so when the
trust snapshot changes (this node's certificate renewed, a peer's CA
rotated) the channels are replaced: new calls go out on a new channel with
the new material while the old one drains its calls in flight and closes.

The server name a channel checks is the one the peer's signed bundle pins
(``e<N>.node.<code>.yikatong.cy``), else the configured one. gRPC Python's
client cannot see the server's certificate to check it against a revocation
list, so a stolen node key is retired by moving the district to a new epoch:
when a bundle pins a new name, channels on the old one are closed at once,
not drained, and a certificate without the new name is refused.
"""

from __future__ import annotations

import asyncio

import grpc

from broker.core.errors import PeerUnavailable
from broker.trust.config import PeerConfig
from broker.trust.store import TrustSnapshot, TrustStore

DRAIN_GRACE_S = 5.0


class PeerChannels:
    """Holds one ``grpc.aio`` channel per peer district.

    Each channel trusts only that peer's CA and checks the peer node's DNS
    name, so a node of district A can never pass for district B.
    """

    def __init__(self, store: TrustStore, peers: tuple[PeerConfig, ...]) -> None:
        self._store = store
        self._peers = {p.district: p for p in peers}
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}
        self._names: dict[tuple[str, str], str] = {}  # the server name each channel checks
        self._generation = store.current.generation
        self._draining: set[asyncio.Task[None]] = set()

    def configured(self, district: str) -> bool:
        return district in self._peers

    def channel(self, district: str, purpose: str = "calls") -> grpc.aio.Channel:
        """The channel to ``district`` (which must be configured).

        ``purpose`` "watch": a channel of its own, with its own connection (a
        local subchannel pool) for the endless ``WatchStatus`` stream, whose
        retries against a peer that is down must not put the gates' channel
        into reconnect backoff.
        """
        peer = self._peers[district]  # KeyError: not a configured peer
        snap = self._store.current
        if snap.generation != self._generation:
            self._retire_all(snap)
            self._generation = snap.generation
        if not snap.trusted(district):
            reason = snap.problems.get(district, "no usable trust material")
            raise PeerUnavailable(district, f"is not trusted: {reason}")
        ch = self._channels.get((district, purpose))
        if ch is None:
            name = self.server_name(district)
            creds = grpc.ssl_channel_credentials(
                root_certificates=snap.peer_roots_pem[district],
                private_key=snap.key_pem,
                certificate_chain=snap.cert_chain_pem,
            )
            ch = grpc.aio.secure_channel(
                peer.address,
                creds,
                options=[
                    ("grpc.ssl_target_name_override", name),
                    ("grpc.default_authority", name),
                    ("grpc.keepalive_time_ms", 30_000),
                    ("grpc.keepalive_timeout_ms", 5_000),
                    # A peer that comes back is used again within a second: the channel
                    # tries to reconnect at least every half second (and the breaker's
                    # probe, broker.peers.client, goes every half second).
                    ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 500),
                    ("grpc.use_local_subchannel_pool", int(purpose != "calls")),
                ],
            )
            self._channels[(district, purpose)] = ch
            self._names[(district, purpose)] = name
        return ch

    def sync(self) -> None:
        """Replace the channels now if trust changed (the node calls it after each reload).

        Without it, channels would only be replaced at the next call to a
        peer: a call in flight on an old pinned name must end at once.
        """
        snap = self._store.current
        if snap.generation != self._generation:
            self._retire_all(snap)
            self._generation = snap.generation

    def server_name(self, district: str) -> str:
        """The name ``district``'s node must present: pinned by its bundle, else configured."""
        pinned = self._store.current.node_name(district)
        return pinned if pinned is not None else self._peers[district].server_name

    def _retire_all(self, snap: TrustSnapshot) -> None:
        """Replace every channel; one whose peer is no longer trusted as it was closes at once."""
        for (district, purpose), ch in self._channels.items():
            same = snap.trusted(district) and self._names.get((district, purpose)) == (
                snap.node_name(district) or self._peers[district].server_name
            )
            task = asyncio.ensure_future(ch.close(grace=DRAIN_GRACE_S if same else None))
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)
        self._channels = {}
        self._names = {}

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
        if self._draining:
            await asyncio.gather(*self._draining, return_exceptions=True)
