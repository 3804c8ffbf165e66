"""A gate operator's client of its district node (used by the demo, benchmark and tests).

Real operators code against ``proto/`` in their own language; this is the
reference client in Python. Its channel follows certificate renewals: a gRPC
client cannot swap its certificate on an open channel, so when the files
change it opens a new channel for new calls and lets the old one drain.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker._proto.yikatong.v1 import gate_pb2, gate_pb2_grpc, types_pb2
from broker.cards.model import CardRef, Scene
from broker.core.watch import FileWatch

DRAIN_GRACE_S = 5.0


def open_channel(
    address: str,
    server_name: str,
    ca_file: Path,
    cert_file: Path,
    key_file: Path,
    options: list[tuple[str, object]] | None = None,
) -> grpc.aio.Channel:
    """A mutual-TLS ``grpc.aio`` channel to a district node."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca_file.read_bytes(),
        private_key=key_file.read_bytes(),
        certificate_chain=cert_file.read_bytes(),
    )
    opts: list[tuple[str, object]] = [
        ("grpc.ssl_target_name_override", server_name),
        ("grpc.default_authority", server_name),
        *(options or []),
    ]
    return grpc.aio.secure_channel(address, creds, options=opts)


def _matching(cert_file: Path, key_file: Path) -> bool:
    """Whether the key and certificate files belong together right now."""
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (OSError, ValueError):
        return False
    return bool(key.public_key() == cert.public_key())


class ReloadingChannel:
    """A channel whose CA bundle, certificate and key come from files and follow their changes."""

    def __init__(
        self,
        address: str,
        server_name: str,
        ca_file: Path,
        cert_file: Path,
        key_file: Path,
        check_every_s: float = 1.0,
    ) -> None:
        self._args = (address, server_name, ca_file, cert_file, key_file)
        self._cert_file, self._key_file = cert_file, key_file
        self._watch = FileWatch((ca_file, cert_file, key_file))
        self._check_every = check_every_s
        self._checked = time.monotonic()
        self._channel = open_channel(*self._args)
        self._draining: set[asyncio.Task[None]] = set()

    def get(self) -> grpc.aio.Channel:
        """The channel for the next call (a new one if the files changed and hold together)."""
        now = time.monotonic()
        if now - self._checked >= self._check_every:
            self._checked = now
            stamps = self._watch.stamps()
            if self._watch.changed(stamps) and _matching(self._cert_file, self._key_file):
                self._watch.mark_seen(stamps)
                old, self._channel = self._channel, open_channel(*self._args)
                task = asyncio.ensure_future(old.close(grace=DRAIN_GRACE_S))
                self._draining.add(task)
                task.add_done_callback(self._draining.discard)
        return self._channel

    async def close(self) -> None:
        await self._channel.close()
        if self._draining:
            await asyncio.gather(*self._draining, return_exceptions=True)


class GateClient:
    """Calls ``Gate.Check`` as one operator."""

    def __init__(
        self,
        channel: grpc.aio.Channel | ReloadingChannel,
        operator_id: str,
        gate_id: str = "gate-1",
    ) -> None:
        self._source = channel
        self._stubs: tuple[grpc.aio.Channel, gate_pb2_grpc.GateStub] | None = None
        self.operator_id = operator_id
        self.gate_id = gate_id

    @property
    def _stub(self) -> gate_pb2_grpc.GateStub:
        ch = self._source.get() if isinstance(self._source, ReloadingChannel) else self._source
        if self._stubs is None or self._stubs[0] is not ch:
            self._stubs = (ch, gate_pb2_grpc.GateStub(ch))
        return self._stubs[1]

    def request(self, ref: CardRef, scene: Scene) -> gate_pb2.GateCheckRequest:
        return gate_pb2.GateCheckRequest(
            card=types_pb2.CardRef(issuer_region=ref.issuer_region, card_number=ref.card_number),
            scene=scene.value,  # type: ignore[arg-type]
            operator_id=self.operator_id,
            gate_id=self.gate_id,
        )

    async def check(self, ref: CardRef, scene: Scene) -> gate_pb2.GateDecision:
        """One check, with a 5 s deadline."""
        result: gate_pb2.GateDecision = await self._stub.Check(
            self.request(ref, scene), timeout=5.0
        )
        return result
