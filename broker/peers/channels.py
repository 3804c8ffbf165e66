"""Mutual-TLS channels to peer district nodes, one per peer, opened lazily."""

from __future__ import annotations

import grpc

from broker.config import PeerConfig, TLSConfig
from broker.tls import read_pem


class PeerChannels:
    """Holds one ``grpc.aio`` channel per peer district.

    Each channel trusts only that peer's CA and checks the peer node's DNS
    name, so a node of district A can never pass for district B.
    """

    def __init__(self, own: TLSConfig, peers: tuple[PeerConfig, ...]) -> None:
        self._own = own
        self._peers = {p.district: p for p in peers}
        self._channels: dict[str, grpc.aio.Channel] = {}

    def configured(self, district: str) -> bool:
        return district in self._peers

    def channel(self, district: str) -> grpc.aio.Channel:
        """The channel to ``district`` (which must be configured)."""
        ch = self._channels.get(district)
        if ch is None:
            peer = self._peers[district]
            creds = grpc.ssl_channel_credentials(
                root_certificates=read_pem(peer.ca_file),
                private_key=read_pem(self._own.key_file),
                certificate_chain=read_pem(self._own.cert_file),
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

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
