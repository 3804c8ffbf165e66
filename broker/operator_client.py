"""A gate operator's client of its district node (used by the demo, benchmark and tests).

Real operators code against ``proto/`` in their own language; this is the
reference client in Python.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from broker._proto.yikatong.v1 import gate_pb2, gate_pb2_grpc, types_pb2
from broker.cards import CardRef, Scene
from broker.config import TLSConfig
from broker.tls import channel_credentials, read_pem


def open_channel(
    address: str,
    server_name: str,
    ca_file: Path,
    cert_file: Path,
    key_file: Path,
    options: list[tuple[str, object]] | None = None,
) -> grpc.aio.Channel:
    """A mutual-TLS ``grpc.aio`` channel to a district node."""
    creds = channel_credentials(read_pem(ca_file), TLSConfig(ca_file, cert_file, key_file))
    opts: list[tuple[str, object]] = [
        ("grpc.ssl_target_name_override", server_name),
        ("grpc.default_authority", server_name),
        *(options or []),
    ]
    return grpc.aio.secure_channel(address, creds, options=opts)


class GateClient:
    """Calls ``Gate.Check`` as one operator."""

    def __init__(
        self, channel: grpc.aio.Channel, operator_id: str, gate_id: str = "gate-1"
    ) -> None:
        self._stub = gate_pb2_grpc.GateStub(channel)
        self.operator_id = operator_id
        self.gate_id = gate_id

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
