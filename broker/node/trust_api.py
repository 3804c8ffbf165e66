"""Trust.GetBundle: this district's signed trust bundle, for its peers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from broker._proto.yikatong.v1 import trust_pb2, trust_pb2_grpc
from broker.core.errors import ConfigError
from broker.trust.bundle import SignedBundle


class TrustServicer(trust_pb2_grpc.TrustServicer):
    """``yikatong.v1.Trust``: peers fetch this district's signed trust bundle."""

    def __init__(self, bundle_file: Path | None) -> None:
        self._bundle_file = bundle_file

    async def GetBundle(
        self, request: trust_pb2.GetBundleRequest, context: grpc.aio.ServicerContext
    ) -> trust_pb2.SignedTrustBundle:
        if self._bundle_file is None:
            raise ConfigError("this node publishes no trust bundle ([trust] bundle_file)")
        try:
            data = await asyncio.to_thread(self._bundle_file.read_bytes)
        except OSError as exc:
            raise ConfigError(f"trust bundle {self._bundle_file} cannot be read") from exc
        signed = SignedBundle.from_json(data)
        return trust_pb2.SignedTrustBundle(
            document=signed.document, signer=signed.signer, signature=signed.signature
        )
