"""gRPC servicers: thin handlers that convert, call one domain function, convert back.

The caller's identity comes from :func:`broker.identity.current_identity`
(bound by the interceptor); errors are raised as :class:`BrokerError` and
mapped to a status by the interceptor.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from datetime import date, datetime
from pathlib import Path

import grpc
import structlog

from broker._proto.yikatong.v1 import (
    gate_pb2,
    gate_pb2_grpc,
    recognition_pb2,
    recognition_pb2_grpc,
    settlement_pb2,
    settlement_pb2_grpc,
    trust_pb2,
    trust_pb2_grpc,
)
from broker.access import require_operator
from broker.bundle import SignedBundle
from broker.clearing.batch import Spool
from broker.clearing.service import ClearingService
from broker.errors import ConfigError, InvalidArgument
from broker.gate import GateService
from broker.identity import current_identity
from broker.intake import MAX_TRIPS_PER_REQUEST, TripIntake
from broker.privacy import Hasher
from broker.recognition import HomeRecognizer
from broker.wire import (
    card_from_wire,
    decision_to_wire,
    recognition_to_wire,
    result_to_wire,
    scene_from_wire,
    signed_from_wire,
    signed_to_wire,
    trip_from_wire,
)

log = structlog.get_logger(__name__)
_MAX_ID = 64


def _short_id(value: str, field: str, required: bool) -> str:
    if (required and not value) or len(value) > _MAX_ID or not value.isprintable():
        raise InvalidArgument(field, f"must be 1-{_MAX_ID} printable characters")
    return value


class RecognitionServicer(recognition_pb2_grpc.RecognitionServicer):
    """``yikatong.v1.Recognition``: peers ask about this district's cards."""

    def __init__(self, home: HomeRecognizer, hasher: Hasher, clock: Callable[[], datetime]) -> None:
        self._home = home
        self._hasher = hasher
        self._clock = clock

    async def Recognize(
        self, request: recognition_pb2.RecognizeRequest, context: grpc.aio.ServicerContext
    ) -> recognition_pb2.RecognizeResponse:
        caller = current_identity()
        ref = card_from_wire(request.card, request.HasField("card"))
        scene_from_wire(request.scene, required=False)
        request_id = _short_id(request.request_id, "request_id", required=False)
        rec = await self._home.recognise(ref, self._clock())
        log.debug(
            "recognized",
            caller=caller.spiffe_id,
            card=self._hasher.card_key(ref),
            status=rec.status.name,
            request_id=request_id,
        )
        return recognition_to_wire(rec)


class GateServicer(gate_pb2_grpc.GateServicer):
    """``yikatong.v1.Gate``: this district's operators check cards at their gates."""

    def __init__(self, gate: GateService) -> None:
        self._gate = gate

    async def Check(
        self, request: gate_pb2.GateCheckRequest, context: grpc.aio.ServicerContext
    ) -> gate_pb2.GateDecision:
        require_operator(current_identity(), request.operator_id)
        ref = card_from_wire(request.card, request.HasField("card"))
        scene = scene_from_wire(request.scene)
        _short_id(request.gate_id, "gate_id", required=True)
        place = _short_id(request.place_id, "place_id", required=False)
        decision = await self._gate.check(
            ref, scene, os.urandom(8).hex(), request.operator_id, place
        )
        return decision_to_wire(decision)


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


class SettlementServicer(settlement_pb2_grpc.SettlementServicer):
    """``yikatong.v1.Settlement``: operators submit trips; peer districts exchange batches."""

    def __init__(self, intake: TripIntake, clearing: ClearingService | None) -> None:
        self._intake = intake
        self._clearing = clearing

    def _service(self) -> ClearingService:
        if self._clearing is None:
            raise ConfigError("this node does not clear ([settlement] key_file is not set)")
        return self._clearing

    async def SubmitTrips(
        self, request: settlement_pb2.SubmitTripsRequest, context: grpc.aio.ServicerContext
    ) -> settlement_pb2.SubmitTripsResponse:
        caller = current_identity()
        if len(request.trips) > MAX_TRIPS_PER_REQUEST:
            raise InvalidArgument("trips", f"at most {MAX_TRIPS_PER_REQUEST} per request")
        items = [trip_from_wire(t, caller.operator_id, i) for i, t in enumerate(request.trips)]
        verdicts = await self._intake.submit(items)
        return settlement_pb2.SubmitTripsResponse(
            results=[
                result_to_wire(t.trip_id, v) for t, v in zip(request.trips, verdicts, strict=True)
            ]
        )

    async def GetTripOutcomes(
        self, request: settlement_pb2.GetTripOutcomesRequest, context: grpc.aio.ServicerContext
    ) -> settlement_pb2.SubmitTripsResponse:
        require_operator(current_identity(), request.operator_id)
        if len(request.trip_ids) > MAX_TRIPS_PER_REQUEST:
            raise InvalidArgument("trip_ids", f"at most {MAX_TRIPS_PER_REQUEST} per request")
        found = await self._intake.outcomes(request.operator_id, list(request.trip_ids))
        return settlement_pb2.SubmitTripsResponse(
            results=[result_to_wire(t, j) for t, j in zip(request.trip_ids, found, strict=True)]
        )

    async def GetStatement(
        self, request: settlement_pb2.GetStatementRequest, context: grpc.aio.ServicerContext
    ) -> settlement_pb2.OperatorStatement:
        require_operator(current_identity(), request.operator_id)
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
        sender = current_identity().district
        spool = Spool()
        try:
            trailer = None
            async for part in request_iterator:
                if trailer is not None:
                    raise InvalidArgument("parts", "nothing may follow the trailer")
                if part.HasField("trailer"):
                    trailer = signed_from_wire(part.trailer)
                else:
                    spool.add(part.lines)
            if trailer is None:
                raise InvalidArgument("trailer", "the batch ended without its signed trailer")
            ack = await self._service().receive(sender, spool, trailer)
        finally:
            spool.close()
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
