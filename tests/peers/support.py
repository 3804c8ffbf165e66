"""Trust material and a stand-in peer node for the peers tests: real certificates, loopback only.

Cheaper than the ``districts`` fixture (no registries, no configs): each district is a CA and
a node certificate made with :mod:`broker.trust.pki`, and a peer is a ``grpc.aio`` server on
port 0 of 127.0.0.1 that demands a client certificate of the home district's CA.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from broker._proto.yikatong.v1 import (
    recognition_pb2,
    recognition_pb2_grpc,
    trust_pb2,
    trust_pb2_grpc,
)
from broker.trust import pki
from broker.trust.bundle import SignedBundle
from broker.trust.config import PeerConfig, TLSConfig, TrustConfig, node_server_name
from broker.trust.identity import Identity, node_identity

HOME, PEER, OTHER = "500111", "512021", "500153"


@dataclass
class District:
    """A district's CA and the node certificate it issued."""

    code: str
    ca: pki.KeyPair
    node: pki.KeyPair

    @classmethod
    def make(cls, code: str, now: datetime, node: Identity | None = None) -> District:
        ca = pki.create_ca(code, now)
        return cls(code, ca, pki.issue(ca, node or node_identity(code), now))


@dataclass(frozen=True)
class Settings:
    """A :class:`broker.trust.config.TrustSettings` without the rest of a node's config."""

    district: str
    tls: TLSConfig
    peers: tuple[PeerConfig, ...] = ()
    trust: TrustConfig = field(default_factory=TrustConfig)

    def peer(self, district: str) -> PeerConfig | None:
        return next((p for p in self.peers if p.district == district), None)


def home_settings(
    root: Path,
    home: District,
    peers: dict[str, tuple[District, str]],
    server_names: dict[str, str] | None = None,
    bundles: bool = False,
    refresh_s: int = 30,
) -> Settings:
    """Write ``home``'s files under ``root`` and configure each peer (code -> (it, address)).

    A peer is trusted through its CA file, written here, or with ``bundles`` through a
    bundle file under ``root/peers`` that the caller must fill before reading a snapshot.
    """
    d = root / home.code
    pki.write_public(d / "ca.pem", home.ca.cert_pem())
    write_crl(home, d / "crl.pem")
    pki.save(home.node, d / "node.pem", d / "node.key")
    configs = []
    for code, (district, address) in peers.items():
        name = (server_names or {}).get(code, node_server_name(code))
        if bundles:
            bundle_file = root / "peers" / f"{code}.bundle.json"
            configs.append(PeerConfig(code, address, None, name, bundle_file=bundle_file))
            continue
        ca_file = root / "peers" / f"{code}.ca.pem"
        pki.write_public(ca_file, district.ca.cert_pem())
        crl_file = write_crl(district, root / "peers" / f"{code}.crl.pem")
        configs.append(PeerConfig(code, address, ca_file, name, crl_file=crl_file))
    return Settings(
        home.code,
        TLSConfig(d / "ca.pem", d / "node.pem", d / "node.key", d / "crl.pem"),
        tuple(configs),
        TrustConfig(bundle_refresh_s=refresh_s),
    )


def write_crl(
    district: District, path: Path, revoked: tuple[int, ...] = (), number: int = 1
) -> Path:
    """Write ``district``'s CA's revocation list (number ``number``) to ``path``."""
    now = datetime.now(UTC)
    crl = pki.build_crl(district.ca, [(s, now) for s in revoked], number, now)
    pki.write_public(path, pki.crl_pem(crl))
    return path


def free_address() -> str:
    """A loopback address nobody listens on (it was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def renew_home_node(settings: Settings, home: District, now: datetime) -> pki.KeyPair:
    """Issue ``home`` a new node certificate and write it where ``settings`` reads it."""
    pair = pki.issue(home.ca, node_identity(home.code), now)
    pki.save(pair, settings.tls.cert_file, settings.tls.key_file)
    return pair


class FakeRecognition(recognition_pb2_grpc.RecognitionServicer):
    """Answers ``answer`` after ``delay`` seconds, or aborts with ``abort``; notes each call.

    ``auth`` keeps each call's auth context (``x509_pem_cert``: the caller's certificate,
    ``ssl_requested_server_name``: the name the caller asked for, ...).
    """

    def __init__(self) -> None:
        self.answer = recognition_pb2.RecognizeResponse()
        self.delay = 0.0
        self.abort: grpc.StatusCode | None = None
        self.requests: list[recognition_pb2.RecognizeRequest] = []
        self.auth: list[dict[str, list[bytes]]] = []
        self.arrived = asyncio.Event()  # set as each call arrives

    async def Recognize(self, request: Any, context: Any) -> Any:
        self.requests.append(request)
        self.auth.append(dict(context.auth_context()))
        self.arrived.set()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.abort is not None:
            await context.abort(self.abort, "refused by the test")
        return self.answer

    async def WatchStatus(self, request: Any, context: Any) -> AsyncIterator[Any]:
        """An older peer that pushes nothing."""
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this peer does not push")
        yield  # never reached (abort raises): what makes this a stream


class FakeTrust(trust_pb2_grpc.TrustServicer):
    """Serves ``bundle`` (or aborts with UNAVAILABLE when it is ``None``)."""

    def __init__(self) -> None:
        self.bundle: SignedBundle | None = None
        self.calls = 0

    async def GetBundle(self, request: Any, context: Any) -> Any:
        self.calls += 1
        if self.bundle is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no bundle")
        assert self.bundle is not None
        return trust_pb2.SignedTrustBundle(
            document=self.bundle.document,
            signer=self.bundle.signer,
            signature=self.bundle.signature,
        )


@dataclass
class PeerServer:
    """A running stand-in for a peer's node."""

    server: Any
    address: str
    recognition: FakeRecognition
    trust: FakeTrust

    @classmethod
    async def start(cls, node: pki.KeyPair, client_ca: pki.KeyPair) -> PeerServer:
        """Serve with ``node``'s certificate; callers must present one of ``client_ca``."""
        server = grpc.aio.server()
        rec, trust = FakeRecognition(), FakeTrust()
        recognition_pb2_grpc.add_RecognitionServicer_to_server(rec, server)
        trust_pb2_grpc.add_TrustServicer_to_server(trust, server)
        creds = grpc.ssl_server_credentials(
            [(node.key_pem(), node.cert_pem())],
            root_certificates=client_ca.cert_pem(),
            require_client_auth=True,
        )
        port = server.add_secure_port("127.0.0.1:0", creds)
        await server.start()
        return cls(server, f"127.0.0.1:{port}", rec, trust)

    async def stop(self) -> None:
        await self.server.stop(grace=None)
