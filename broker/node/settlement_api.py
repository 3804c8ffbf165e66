"""gRPC servicers: thin handlers that convert, call one domain function, convert back.

The caller's identity comes from :func:`broker.trust.identity.current_identity`
(bound by the interceptor); errors are raised as :class:`BrokerError` and
mapped to a status by the interceptor.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from datetime import date
from typing import Any

import grpc
import structlog

from broker._proto.yikatong.v1 import settlement_pb2, settlement_pb2_grpc
from broker.core.errors import ConfigError, InvalidArgument
from broker.core.signing import Signed
from broker.settlement.clearing.batch import Spool
from broker.settlement.clearing.service import ClearingService
from broker.settlement.clearing.tail import Hint
from broker.settlement.clearing.worker import Streamed
from broker.settlement.config import SettlementKeyConfig
from broker.settlement.intake import MAX_TRIPS_PER_REQUEST, Trips
from broker.settlement.wire import signed_from_wire, signed_to_wire
from broker.trust.identity import current_identity

log = structlog.get_logger(__name__)


# Methods whose request bytes the guard hands over undecoded (see AuthInterceptor).
UNDECODED = frozenset({"/yikatong.v1.Settlement/SubmitTrips"})


class TripsServicer(settlement_pb2_grpc.SettlementServicer):
    """``yikatong.v1.Settlement``'s trip intake alone (``SubmitTrips``, ``GetTripOutcomes``):
    what the intake port serves (:mod:`broker.node.intake_port`); any other method of the
    service is UNIMPLEMENTED there."""

    def __init__(self, intake: Trips) -> None:
        self._intake = intake

    # The request arrives undecoded (the guard passes SubmitTrips' bytes through: it names no
    # operator) and the answer leaves encoded: both are the intake worker's work, off this
    # process's interpreter lock. mypy: the generated base class types them as messages.
    async def SubmitTrips(  # type: ignore[override]
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        return await self._intake.submit(request, current_identity().operator_id)

    async def GetTripOutcomes(  # type: ignore[override]
        self, request: settlement_pb2.GetTripOutcomesRequest, context: grpc.aio.ServicerContext
    ) -> bytes:
        if len(request.trip_ids) > MAX_TRIPS_PER_REQUEST:
            raise InvalidArgument("trip_ids", f"at most {MAX_TRIPS_PER_REQUEST} per request")
        return await self._intake.outcomes(request.operator_id, list(request.trip_ids))

    # Clearing's methods are SettlementServicer's: here (the intake port) they are UNIMPLEMENTED.
    async def GetStatement(
        self, request: settlement_pb2.GetStatementRequest, context: grpc.aio.ServicerContext
    ) -> settlement_pb2.OperatorStatement:
        raise NotImplementedError

    async def PublishFares(
        self, request: settlement_pb2.SignedDocument, context: grpc.aio.ServicerContext
    ) -> settlement_pb2.PublishFaresResponse:
        raise NotImplementedError

    async def ExchangeBatch(
        self,
        request_iterator: AsyncIterator[settlement_pb2.BatchPart],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[settlement_pb2.AckPart]:
        raise NotImplementedError
        yield  # an async generator, as the override is

    async def ConfirmDay(
        self, request: settlement_pb2.SignedDocument, context: grpc.aio.ServicerContext
    ) -> settlement_pb2.SignedDocument:
        raise NotImplementedError


class SettlementServicer(TripsServicer):
    """``yikatong.v1.Settlement``: operators submit trips; peer districts exchange batches."""

    def __init__(
        self,
        intake: Trips,
        clearing: ClearingService | None,
        settings: SettlementKeyConfig | None = None,
    ) -> None:
        super().__init__(intake)
        self._clearing = clearing
        self._settings = settings or SettlementKeyConfig()

    def _service(self) -> ClearingService:
        if self._clearing is None:
            raise ConfigError("this node does not clear ([settlement] key_file is not set)")
        return self._clearing

    async def GetStatement(
        self, request: settlement_pb2.GetStatementRequest, context: grpc.aio.ServicerContext
    ) -> settlement_pb2.OperatorStatement:
        try:
            period = date.fromisoformat(request.period)
        except ValueError:
            raise InvalidArgument("period", "must be a day, YYYY-MM-DD") from None
        lines = await self._service().statement(period, request.operator_id)
        return settlement_pb2.OperatorStatement(
            operator_id=request.operator_id,
            period=request.period,
            lines=[settlement_pb2.StatementLine(**asdict(line)) for line in lines],
        )

    async def PublishFares(
        self, request: settlement_pb2.SignedDocument, context: grpc.aio.ServicerContext
    ) -> settlement_pb2.PublishFaresResponse:
        versions = await self._service().publish_fares(
            current_identity().district, signed_from_wire(request)
        )
        return settlement_pb2.PublishFaresResponse(versions=versions)

    async def ExchangeBatch(
        self,
        request_iterator: AsyncIterator[settlement_pb2.BatchPart],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[settlement_pb2.AckPart]:
        """Spool a neighbour's batch as it arrives, within the maxima, then verify and answer it.

        Each chunk is checked against ``[settlement] max_batch_lines`` and
        ``max_batch_bytes`` before it is written: the one that would pass a
        maximum refuses the call (RESOURCE_EXHAUSTED) and the spool is dropped.
        """
        sender = current_identity().district
        service = self._service()  # a node that does not clear says so before anything
        # No digest here: the worker works it out again from the spool it verifies.
        spool = Spool(self._settings.max_batch_lines, self._settings.max_batch_bytes, hashed=False)
        # The sender's word for which batch this is: then it is verified as it arrives.
        hint = Hint.from_metadata(context.invocation_metadata())
        streamed: Streamed | None = None
        try:
            if hint is not None:
                streamed = service.stream(sender, spool, hint)
            trailer = await _spooled(request_iterator, spool)
            receiving = asyncio.ensure_future(service.receive(sender, spool, trailer, streamed))
        except BaseException:  # refused, or cancelled while spooling: nothing is committed
            if streamed is None:
                spool.close()  # no worker reads it yet
            else:  # the worker reading it as it came stops; then the spool is closed
                streamed.abandon()
                streamed.work.add_done_callback(_close_when_done(spool))
            raise
        receiving.add_done_callback(_close_when_done(spool))
        # A cancelled call cannot stop the worker thread reading the spool: the spool is
        # closed when the worker is done (above), never under it.
        ack = await asyncio.shield(receiving)
        for chunk in ack.chunks:
            yield settlement_pb2.AckPart(verdicts=chunk)
        yield settlement_pb2.AckPart(ack=signed_to_wire(ack.signed))

    async def ConfirmDay(
        self, request: settlement_pb2.SignedDocument, context: grpc.aio.ServicerContext
    ) -> settlement_pb2.SignedDocument:
        reply = await self._service().confirm(
            current_identity().district, signed_from_wire(request)
        )
        return signed_to_wire(reply)


async def _spooled(parts: AsyncIterator[settlement_pb2.BatchPart], spool: Spool) -> Signed:
    """Every chunk of a batch into ``spool``, as it arrives; the signed trailer that ends it."""
    trailer = None
    async for part in parts:
        if trailer is not None:
            raise InvalidArgument("parts", "nothing may follow the trailer")
        if part.HasField("trailer"):
            trailer = signed_from_wire(part.trailer)
        else:
            spool.add(part.lines)
    if trailer is None:
        raise InvalidArgument("trailer", "the batch ended without its signed trailer")
    return trailer


def _close_when_done(spool: Spool) -> Callable[[asyncio.Future[Any]], None]:
    def done(work: asyncio.Future[Any]) -> None:
        spool.close()
        if not work.cancelled():
            work.exception()  # retrieved: a call cancelled meanwhile never awaits it

    return done
