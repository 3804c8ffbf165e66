"""Recognition.Recognize: a peer district asks about one of this district's cards."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import datetime

import grpc
import structlog

from broker._proto.yikatong.v1 import recognition_pb2, recognition_pb2_grpc
from broker.cards.privacy import Hasher
from broker.cards.wire import card_from_wire, recognition_to_wire, scene_from_wire
from broker.gate.home import HomeRecognizer
from broker.node.fields import trace_id_or_new
from broker.trust.identity import current_identity

log = structlog.get_logger(__name__)


class RecognitionServicer(recognition_pb2_grpc.RecognitionServicer):
    """``yikatong.v1.Recognition``: peers ask about this district's cards.

    A peer's ``request_id`` is kept only if it is a W3C trace-id; an empty,
    malformed or oversized one is replaced by a generated trace-id, never
    refused and never logged. ``request_ids_replaced`` counts the
    replacements by reason (``empty``, ``malformed``, ``oversized``).
    """

    def __init__(self, home: HomeRecognizer, hasher: Hasher, clock: Callable[[], datetime]) -> None:
        self._home = home
        self._hasher = hasher
        self._clock = clock
        self.request_ids_replaced: Counter[str] = Counter()

    async def Recognize(
        self, request: recognition_pb2.RecognizeRequest, context: grpc.aio.ServicerContext
    ) -> recognition_pb2.RecognizeResponse:
        caller = current_identity()
        request_id, replaced = trace_id_or_new(request.request_id)
        if replaced is not None:
            self.request_ids_replaced[replaced] += 1
        ref = card_from_wire(request.card, request.HasField("card"))
        scene_from_wire(request.scene, required=False)
        rec = await self._home.recognise(ref, self._clock())
        log.debug(
            "recognized",
            caller=caller.spiffe_id,
            card=self._hasher.card_key(ref),
            status=rec.status.name,
            request_id=request_id,
            request_id_replaced=replaced,
        )
        return recognition_to_wire(rec)
