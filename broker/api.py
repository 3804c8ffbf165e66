"""gRPC servicers: thin handlers that convert, call one domain function, convert back.

The caller's identity comes from :func:`broker.identity.current_identity`
(bound by the interceptor); errors are raised as :class:`BrokerError` and
mapped to a status by the interceptor.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from datetime import datetime
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
    """``yikatong.v1.Settlement``: this district's operators submit the trips they priced."""

    def __init__(self, intake: TripIntake) -> None:
        self._intake = intake

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
