"""Trust.GetBundle: this district's signed trust bundle, for its peers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import grpc
import structlog

from broker._proto.yikatong.v1 import trust_pb2, trust_pb2_grpc
from broker.core.errors import ConfigError, Unauthenticated
from broker.trust.bundle import Bundle, BundleRefused, SignedBundle, note_served
from broker.trust.identity import Role, current_identity

log = structlog.get_logger(__name__)


class TrustServicer(trust_pb2_grpc.TrustServicer):
    """``yikatong.v1.Trust``: peers fetch this district's signed trust bundle.

    Which bundle each peer last fetched is noted beside the bundle
    (:func:`broker.trust.bundle.note_served`): ``broker trust status`` shows
    it, and a CA rotation does not go on while a peer has not seen the
    publish stage.
    """

    def __init__(
        self, bundle_file: Path | None, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self._bundle_file = bundle_file
        self._clock = clock
        self._noted: dict[str, int] = {}

    async def GetBundle(
        self, request: trust_pb2.GetBundleRequest, context: grpc.aio.ServicerContext
    ) -> trust_pb2.SignedTrustBundle:
        if self._bundle_file is None:
            raise ConfigError("this node publishes no trust bundle ([trust] bundle_file)")
        try:
            data = await asyncio.to_thread(self._bundle_file.read_bytes)
        except OSError as exc:
            raise ConfigError(f"trust bundle {self._bundle_file} cannot be read") from exc
        try:
            signed = SignedBundle.from_json(data)
        except BundleRefused as exc:  # our own file is broken: not the caller's doing
            raise ConfigError(f"trust bundle {self._bundle_file} is not usable: {exc}") from exc
        await self._note_fetch(signed)
        return trust_pb2.SignedTrustBundle(
            document=signed.document, signer=signed.signer, signature=signed.signature
        )

    async def _note_fetch(self, signed: SignedBundle) -> None:
        """Note a peer node's fetch; never fails the call (serving the bundle matters more)."""
        try:
            caller, bundle = current_identity(), Bundle.parse(signed.document)
        except (Unauthenticated, BundleRefused):
            return
        if caller.role is Role.NODE and caller.district != bundle.district:
            await self._note(caller.district, bundle.sequence)

    async def _note(self, district: str, sequence: int) -> None:
        if self._noted.get(district) == sequence or self._bundle_file is None:
            return
        try:
            await asyncio.to_thread(
                note_served, self._bundle_file, district, sequence, self._clock()
            )
        except (OSError, BundleRefused) as exc:  # serving the bundle matters more
            log.warning("bundle_served_not_noted", district=district, reason=str(exc))
            return
        self._noted[district] = sequence
