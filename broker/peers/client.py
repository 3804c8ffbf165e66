"""Calling a peer district's ``Recognition.Recognize`` with a deadline."""

from __future__ import annotations

import grpc

from broker._proto.yikatong.v1 import recognition_pb2, recognition_pb2_grpc
from broker.cards.model import CardRef, Recognition, Scene
from broker.cards.wire import card_to_wire, recognition_from_wire
from broker.core.errors import PeerUnavailable
from broker.peers.channels import PeerChannels


class PeerClient:
    """Asks peer districts about their cards; every failure is a :class:`PeerUnavailable`."""

    def __init__(self, channels: PeerChannels, deadline_ms: int) -> None:
        self._channels = channels
        self._timeout = deadline_ms / 1000
        self.deadline_ms = deadline_ms

    def configured(self, district: str) -> bool:
        return self._channels.configured(district)

    async def recognize(self, ref: CardRef, scene: Scene, request_id: str) -> Recognition:
        district = ref.issuer_region
        stub = recognition_pb2_grpc.RecognitionStub(self._channels.channel(district))
        request = recognition_pb2.RecognizeRequest(
            card=card_to_wire(ref),
            scene=scene.value,  # type: ignore[arg-type]
            request_id=request_id,
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
