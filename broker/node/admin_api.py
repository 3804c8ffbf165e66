"""CardAdmin: the district's own back office changes its cards' status on a running node.

A thin handler over :func:`broker.cards.status_change.set_status`, run on a
thread with a registry connection of its own (the change commits, with its
events, without holding up the registry reads that answer gates). Only this
district's ``admin/<id>`` certificates may call it (the access policy).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import grpc
import structlog

from broker._proto.yikatong.v1 import admin_pb2, admin_pb2_grpc, types_pb2
from broker.cards.config import RegistryConfig
from broker.cards.registry import Registry
from broker.cards.status_change import StatusChangeResult, set_status
from broker.cards.wire import instant_from_wire
from broker.core.errors import InvalidArgument
from broker.trust.identity import current_identity

log = structlog.get_logger(__name__)

MAX_CARDS = 10_000
_STATUSES = {
    types_pb2.CARD_STATUS_LOST: "lost",
    types_pb2.CARD_STATUS_SUSPENDED: "suspended",
    types_pb2.CARD_STATUS_ACTIVE: "active",
}


class CardAdminServicer(admin_pb2_grpc.CardAdminServicer):
    """``yikatong.v1.CardAdmin``."""

    def __init__(self, where: RegistryConfig | Path, clock: Callable[[], datetime]) -> None:
        self._where = where
        self._clock = clock
        self._registry: Registry | None = None  # opened on the first call, on the thread
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="card-admin")

    async def SetCardStatus(
        self, request: admin_pb2.SetCardStatusRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.SetCardStatusResponse:
        caller = current_identity()
        numbers = list(request.card_numbers)
        if not 1 <= len(numbers) <= MAX_CARDS:
            raise InvalidArgument("card_numbers", f"must list 1 to {MAX_CARDS} cards")
        if request.status not in _STATUSES:
            raise InvalidArgument("status", "must be LOST, SUSPENDED or ACTIVE")
        changed_at = None
        if request.HasField("changed_at"):
            changed_at = instant_from_wire(
                request.changed_at.seconds, request.changed_at.nanos, "changed_at"
            )
        status, now = _STATUSES[request.status], self._clock()
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(
            self._thread, self._set, numbers, status, now, changed_at
        )
        log.info(
            "card_status_set",
            caller=caller.spiffe_id,
            status=status,
            changed=result.changed,
            unchanged=result.unchanged,
            unknown=len(result.unknown),
        )
        return admin_pb2.SetCardStatusResponse(
            changed=result.changed,
            unchanged=result.unchanged,
            unknown=list(result.unknown),
            first_seq=result.first_seq or 0,
            last_seq=result.last_seq or 0,
        )

    def _set(
        self, numbers: list[str], status: str, now: datetime, changed_at: datetime | None
    ) -> StatusChangeResult:
        if self._registry is None:
            self._registry = Registry(self._where)
        return set_status(self._registry, numbers, status, now, changed_at)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        if self._registry is not None:
            self._registry.close()
