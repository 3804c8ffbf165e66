"""Mutual-TLS channels to peer district nodes, one per peer, renewed when trust changes.

A gRPC client cannot swap its certificate on an open channel, so when the
trust snapshot changes (this node's certificate renewed, a peer's CA
rotated) the channels are replaced: new calls go out on a new channel with
the new material while the old one drains its calls in flight and closes.
"""

from __future__ import annotations

import asyncio

import grpc

from broker.trust.config import PeerConfig
from broker.trust.store import TrustStore

DRAIN_GRACE_S = 5.0


class PeerChannels:
    """Holds one ``grpc.aio`` channel per peer district.

    Each channel trusts only that peer's CA and checks the peer node's DNS
    name, so a node of district A can never pass for district B.
    """

    def __init__(self, store: TrustStore, peers: tuple[PeerConfig, ...]) -> None:
        self._store = store
        self._peers = {p.district: p for p in peers}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._generation = store.current.generation
        self._draining: set[asyncio.Task[None]] = set()

    def configured(self, district: str) -> bool:
        return district in self._peers

    def channel(self, district: str) -> grpc.aio.Channel:
        """The channel to ``district`` (which must be configured)."""
        snap = self._store.current
        if snap.generation != self._generation:
            self._retire_all()
            self._generation = snap.generation
        ch = self._channels.get(district)
        if ch is None:
            peer = self._peers[district]
            creds = grpc.ssl_channel_credentials(
                root_certificates=snap.peer_roots_pem[district],
                private_key=snap.key_pem,
                certificate_chain=snap.cert_chain_pem,
            )
            ch = grpc.aio.secure_channel(
                peer.address,
                creds,
                options=[
                    ("grpc.ssl_target_name_override", peer.server_name),
                    ("grpc.default_authority", peer.server_name),
                    ("grpc.keepalive_time_ms", 30_000),
                    ("grpc.keepalive_timeout_ms", 5_000),
                    # A peer that comes back is used again within about a second.
                    ("grpc.initial_reconnect_backoff_ms", 200),
                    ("grpc.max_reconnect_backoff_ms", 2_000),
                ],
            )
            self._channels[district] = ch
        return ch

    def _retire_all(self) -> None:
        for ch in self._channels.values():
            task = asyncio.ensure_future(ch.close(grace=DRAIN_GRACE_S))
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)
        self._channels = {}

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
        if self._draining:
            await asyncio.gather(*self._draining, return_exceptions=True)
