"""This node's TLS material, its peers and trust bundles: the trust concern's configuration."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

TLS_VERSIONS = ("1.2", "1.3")


# The node's pinned name, epoch first: e1.node.500111.yikatong.cy
NODE_NAME_RE = re.compile(r"e[1-9][0-9]{0,5}\.node\.[0-9]{6}\.yikatong\.cy")


def node_server_name(district: str) -> str:
    """The DNS name a district node's certificate carries, used for hostname checks."""
    return f"node.{district}.yikatong.cy"


def node_epoch_name(district: str, epoch: int) -> str:
    """The node's name in epoch ``epoch``: what peers pin, from the district's trust bundle.

    A stolen node key is retired by moving to the next epoch: the bundle names
    the new one, and peers stop accepting a certificate without it.
    """
    if epoch < 1:
        raise ValueError("node epochs start at 1")
    return f"e{epoch}.node.{district}.yikatong.cy"


@dataclass(frozen=True)
class TLSConfig:
    """This node's own mutual-TLS material.

    Attributes:
        ca_file: PEM of this district's CA certificate(s); callers of the Gate
            (operators) and this node's certificate chain to it.
        cert_file: PEM of this node's certificate.
        key_file: PEM of this node's private key (mode 0600).
        crl_file: PEM revocation list(s) signed by this district's CA(s);
            required: a node that cannot read it does not start.
        min_version: lowest TLS version a call may arrive over ("1.2" or "1.3");
            gRPC Python cannot set it on the socket, so it is enforced per call.
        max_connection_age_s: connections are closed (gracefully) after this
            long, so a rotated-out or revoked caller cannot stay connected.
        reload_interval_ms: how often the files above are checked for changes.
    """

    ca_file: Path
    cert_file: Path
    key_file: Path
    crl_file: Path
    min_version: str = "1.3"
    max_connection_age_s: int = 300
    reload_interval_ms: int = 1000


@dataclass(frozen=True)
class PeerConfig:
    """A neighbouring district this node recognises cards with.

    Attributes:
        district: the peer's 6-digit district code.
        address: host:port of the peer's node.
        ca_file: PEM of the peer district's CA(s), when no bundle is used.
        server_name: DNS name expected in the peer node's certificate.
        crl_file: PEM revocation list(s) of the peer district, when no bundle is used.
        bundle_file: where this node keeps the peer's signed trust bundle; when
            set, the peer's CAs and revocation lists come from it, and it is
            refreshed from the peer over the network.
    """

    district: str
    address: str
    ca_file: Path | None
    server_name: str
    crl_file: Path | None = None
    bundle_file: Path | None = None


@dataclass(frozen=True)
class TrustConfig:
    """Trust bundles.

    Attributes:
        bundle_file: this district's own signed bundle (``certs/<d>/bundle.json``),
            served to peers by ``Trust.GetBundle``; ``None`` serves none.
        bundle_refresh_s: how often each peer's bundle is fetched.
        max_bundle_age_s: a peer bundle issued longer ago than this (the home
            republishes daily) turns that peer's health NOT_SERVING: someone
            may be withholding the newer one.
        bundle_hard_age_s: past this, the peer is not trusted at all.
        crl_state_file: where the highest revocation-list number accepted per
            CA is kept, so that a restart cannot accept an older list again.
    """

    bundle_file: Path | None = None
    bundle_refresh_s: int = 30
    max_bundle_age_s: int = 2 * 86_400
    bundle_hard_age_s: int = 7 * 86_400
    crl_state_file: Path | None = None


class TrustSettings(Protocol):
    """The part of a node's configuration that trust material is read from.

    ``broker.node.config.NodeConfig`` provides it; lower layers take this view
    so that they never import the node's configuration.
    """

    @property
    def district(self) -> str: ...
    @property
    def tls(self) -> TLSConfig: ...
    @property
    def peers(self) -> tuple[PeerConfig, ...]: ...
    @property
    def trust(self) -> TrustConfig: ...

    def peer(self, district: str) -> PeerConfig | None: ...
