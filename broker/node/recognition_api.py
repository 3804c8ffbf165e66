"""Recognition.Recognize: a peer district asks about one of this district's cards."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import datetime, timedelta

import grpc
import structlog

from broker._proto.yikatong.v1 import recognition_pb2, recognition_pb2_grpc
from broker.cards.handles import Handle, valid_handle
from broker.cards.privacy import Hasher
from broker.cards.wire import (
    card_from_wire,
    position_from_wire,
    recognition_to_wire,
    scene_from_wire,
    update_to_wire,
)
from broker.gate.home import HomeRecognizer
from broker.gate.push import HandleBook, StatusFeed
from broker.node.fields import trace_id_or_new
from broker.trust.identity import current_identity

log = structlog.get_logger(__name__)

# A handle lives past the answer's TTL by this much: the peer counts the TTL from when the
# answer reaches it (a peer call may take up to 60 s), and the clocks of the writer of a
# change and of this node may differ a little.
REACH_MARGIN = timedelta(seconds=65)


class RecognitionServicer(recognition_pb2_grpc.RecognitionServicer):
    """``yikatong.v1.Recognition``: peers ask about this district's cards.

    A peer's ``request_id`` is kept only if it is a W3C trace-id; an empty,
    malformed or oversized one is replaced by a generated trace-id, never
    refused and never logged. ``request_ids_replaced`` counts the
    replacements by reason (``empty``, ``malformed``, ``oversized``).
    """

    def __init__(
        self,
        home: HomeRecognizer,
        hasher: Hasher,
        clock: Callable[[], datetime],
        book: HandleBook | None = None,
        feed: StatusFeed | None = None,
        watch_lifetime_s: float | None = None,
    ) -> None:
        """``book`` and ``feed``: this home pushes status changes to peers that give a handle
        (both, or neither). ``watch_lifetime_s``: a ``WatchStatus`` stream ends after this
        long (the connection's age; the grace that lets a long exchange finish must not
        keep an endless stream on an old connection): the peer resumes from its cursor."""
        self._home = home
        self._hasher = hasher
        self._clock = clock
        self._book = book
        self._feed = feed
        self._watch_lifetime_s = watch_lifetime_s
        self.request_ids_replaced: Counter[str] = Counter()
        self.handles_refused = 0  # handles given that were not 32 lowercase hex characters
        self._handles_failing = False

    async def Recognize(
        self, request: recognition_pb2.RecognizeRequest, context: grpc.aio.ServicerContext
    ) -> recognition_pb2.RecognizeResponse:
        caller = current_identity()
        request_id, replaced = trace_id_or_new(request.request_id)
        if replaced is not None:
            self.request_ids_replaced[replaced] += 1
        ref = card_from_wire(request.card, request.HasField("card"))
        scene_from_wire(request.scene, required=False)
        now = self._clock()
        self._home.require_own(ref)
        kept = await self._keep_handle(caller.district, ref.card_number, request.handle, now)
        # The log's position is read after the handle is committed, with the card: a change
        # the answer does not show is then one the feed will send (broker.gate.push).
        if self._feed is not None:
            rec = await self._home.recognise_with_position(ref, now)
        else:
            rec = await self._home.recognise(ref, now)
        if kept is False:
            rec = replace(rec, ttl_seconds=0)  # no push for it: the peer must not cache it
        log.debug(
            "recognized",
            caller=caller.spiffe_id,
            card=self._hasher.card_key(ref),
            status=rec.status.name,
            request_id=request_id,
            request_id_replaced=replaced,
        )
        return recognition_to_wire(rec)

    async def _keep_handle(
        self, peer: str, card_number: str, handle: str, now: datetime
    ) -> bool | None:
        """Whether the handle was kept; ``None`` when none was given or this home does not
        push (the answer is cached on its TTL alone). Never logs the handle."""
        if self._book is None or not handle:
            return None
        if not valid_handle(handle):
            self.handles_refused += 1
            return None
        until = now + timedelta(seconds=self._home.longest_ttl()) + REACH_MARGIN
        try:
            await self._book.remember(Handle(peer, card_number, handle, until))
        except Exception as exc:  # the registry busy or failing: answer, but not for caching
            if not self._handles_failing:
                log.warning("handles_not_kept", error=type(exc).__name__)
            self._handles_failing = True
            return False
        if self._handles_failing:
            log.info("handles_kept_again")
        self._handles_failing = False
        return True

    async def WatchStatus(
        self, request: recognition_pb2.WatchStatusRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[recognition_pb2.StatusUpdate]:
        """The changes of the cards this peer holds handles for, from its cursor on."""
        if self._feed is None:
            raise NotImplementedError("this home does not push status changes")
        caller = current_identity()
        after = position_from_wire(request.after, "after") if request.HasField("after") else None
        async for update in self._feed.updates(caller.district, after, self._watch_lifetime_s):
            yield update_to_wire(update)
