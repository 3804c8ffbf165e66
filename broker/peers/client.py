"""Calling a peer district's ``Recognition.Recognize`` with a deadline, behind a breaker.

A peer that is down or frozen fails every call, each after the whole
deadline. One :class:`broker.core.breaker.Breaker` per peer district opens
after three failures in a row: calls are then refused at once (the gate
falls back without waiting), and every half second one call goes through as
a probe. Its success closes the breaker; so, with the channel reconnecting
at least every half second, a peer that answers again is used within a
second. State changes are logged, never one line per call.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncGenerator, Callable

import grpc
import structlog

from broker._proto.yikatong.v1 import recognition_pb2, recognition_pb2_grpc
from broker.cards.model import CardRef, LogPosition, Recognition, Scene
from broker.cards.updates import Update
from broker.cards.wire import (
    card_to_wire,
    position_to_wire,
    recognition_from_wire,
    update_from_wire,
)
from broker.core.breaker import THRESHOLD, Breaker, State
from broker.core.errors import PeerUnavailable
from broker.peers.channels import PeerChannels

log = structlog.get_logger(__name__)

# The W3C trace-id format, as broker.node.fields checks it on the serving side
# (this layer may not import broker.node): 32 lower-case hex digits, not all zeros.
_TRACE_ID = re.compile(r"(?!0{32})[0-9a-f]{32}")


def trace_id(request_id: str) -> str:
    """``request_id`` if it is a W3C trace-id, else a new random one.

    The peer would replace anything else with an id of its own, and an id
    that is not a trace-id (a gate's, say) is this district's to keep.
    """
    if _TRACE_ID.fullmatch(request_id):
        return request_id
    while not _TRACE_ID.fullmatch(value := secrets.token_hex(16)):
        pass  # all zeros: one chance in 2**128
    return value


def _logged_breaker(district: str) -> Breaker:
    def changed(old: State, new: State) -> None:
        if new is State.OPEN and old is State.CLOSED:
            log.warning("peer_breaker_open", district=district)
        elif new is State.CLOSED:
            log.info("peer_breaker_closed", district=district)

    return Breaker(on_change=changed)


class PeerClient:
    """Asks peer districts about their cards; every failure is a :class:`PeerUnavailable`."""

    def __init__(
        self,
        channels: PeerChannels,
        deadline_ms: int,
        breaker: Callable[[str], Breaker] | None = None,
    ) -> None:
        """``breaker``: makes the breaker of a district (default: :class:`Breaker` with its
        defaults, its changes logged)."""
        self._channels = channels
        self._timeout = deadline_ms / 1000
        self.deadline_ms = deadline_ms
        self._make_breaker = breaker or _logged_breaker
        self._breakers: dict[str, Breaker] = {}

    def breaker(self, district: str) -> Breaker:
        """``district``'s breaker (made on first use)."""
        b = self._breakers.get(district)
        if b is None:
            b = self._breakers[district] = self._make_breaker(district)
        return b

    def configured(self, district: str) -> bool:
        return self._channels.configured(district)

    async def recognize(
        self, ref: CardRef, scene: Scene, request_id: str, handle: str = ""
    ) -> Recognition:
        """The home's answer; ``handle``: our name for the card, by which the home pushes
        its changes to us (see broker.gate.push)."""
        district = ref.issuer_region
        breaker = self.breaker(district)
        if not breaker.allow():
            raise PeerUnavailable(
                district,
                f"not asked: it failed {THRESHOLD}+ times in a row "
                f"(next try in {breaker.retry_in_s() * 1000:.0f} ms)",
            )
        try:
            rec = await self._recognize(district, ref, scene, request_id, handle)
        except PeerUnavailable:
            breaker.failed()
            raise
        breaker.succeeded()
        return rec

    async def _recognize(
        self, district: str, ref: CardRef, scene: Scene, request_id: str, handle: str
    ) -> Recognition:
        stub = recognition_pb2_grpc.RecognitionStub(self._channels.channel(district))
        request = recognition_pb2.RecognizeRequest(
            card=card_to_wire(ref),
            scene=scene.value,  # type: ignore[arg-type]
            request_id=trace_id(request_id),
            handle=handle,
        )
        try:
            response = await stub.Recognize(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                reason = f"did not answer within {self.deadline_ms} ms"
            else:
                reason = f"answered {exc.code().name}"
            raise PeerUnavailable(district, reason) from exc
        return recognition_from_wire(response)

    async def watch_status(
        self, district: str, after: LogPosition | None
    ) -> AsyncGenerator[Update, None]:
        """``district``'s updates about the cards we gave it handles for, from ``after`` on.

        Endless while the stream lasts; its end, however it comes (connection
        ageing, the peer down, a trust change), is a :class:`PeerUnavailable`,
        and the caller resumes from the last position it applied. An update
        that does not read is ``InvalidArgument`` (the caller cannot apply it).
        """
        stub = recognition_pb2_grpc.RecognitionStub(self._channels.channel(district, "watch"))
        request = recognition_pb2.WatchStatusRequest()
        if after is not None:
            request.after.CopyFrom(position_to_wire(after))
        call = stub.WatchStatus(request)
        try:
            async for message in call:
                yield update_from_wire(message)
        except grpc.aio.AioRpcError as exc:
            raise PeerUnavailable(district, f"watch ended {exc.code().name}") from exc
        finally:
            call.cancel()
        raise PeerUnavailable(district, "watch ended")
