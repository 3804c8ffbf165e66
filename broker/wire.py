"""Conversions between wire messages (yikatong.v1) and domain values.

The only module besides the servicers and the peer client that imports the
generated code; domain modules never see a protobuf message.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from broker._proto.yikatong.v1 import gate_pb2, recognition_pb2, settlement_pb2, types_pb2
from broker.cards import CardRef, CardStatus, Entitlement, Recognition, Scene, card_ref
from broker.clearing.signing import Signed
from broker.errors import InvalidArgument
from broker.gate import Decision
from broker.trips import Judgement, Outcome, Reason, Trip

_STATUSES = {s.value for s in CardStatus}
_ENTITLEMENTS = {e.value for e in Entitlement}
_SCENES = {s.value for s in Scene}
_SCENE_OF = {s.value: s for s in Scene}
_ENTITLEMENT_OF = {e.value: e for e in Entitlement}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def card_from_wire(msg: types_pb2.CardRef, present: bool, prefix: str = "card") -> CardRef:
    """Validate a wire ``CardRef``; errors name the field (``card.card_number`` …)."""
    if not present:
        raise InvalidArgument(prefix, "is required")
    return card_ref(msg.issuer_region, msg.card_number, prefix)


def scene_from_wire(value: int, required: bool = True) -> Scene:
    """Validate a wire ``Scene``; unknown values (and, if ``required``, UNSPECIFIED) are refused."""
    if value not in _SCENES or (required and value == Scene.UNSPECIFIED):
        raise InvalidArgument("scene", "must be one of BUS, SCENIC_AREA, MUSEUM, LIBRARY")
    return _SCENE_OF[value]


def card_to_wire(ref: CardRef) -> types_pb2.CardRef:
    return types_pb2.CardRef(issuer_region=ref.issuer_region, card_number=ref.card_number)


def recognition_to_wire(rec: Recognition) -> recognition_pb2.RecognizeResponse:
    return recognition_pb2.RecognizeResponse(
        status=rec.status.value,  # type: ignore[arg-type]
        entitlements=[e.value for e in rec.entitlements],  # type: ignore[misc]
        cache_ttl_seconds=rec.ttl_seconds,
    )


def recognition_from_wire(msg: recognition_pb2.RecognizeResponse) -> Recognition:
    """Read a peer's answer defensively: unknown enum values become UNKNOWN / are dropped."""
    status = CardStatus(msg.status) if msg.status in _STATUSES else CardStatus.UNKNOWN
    ents = tuple(Entitlement(e) for e in msg.entitlements if e in _ENTITLEMENTS)
    if status is not CardStatus.ACTIVE:
        ents = ()
    return Recognition(status, ents, int(msg.cache_ttl_seconds))


def _applied(d: Decision) -> types_pb2.Entitlement.ValueType:
    ent = d.price.applied_entitlement
    return types_pb2.Entitlement.ValueType(ent.value if ent else 0)


def decision_to_wire(d: Decision) -> gate_pb2.GateDecision:
    return gate_pb2.GateDecision(
        allow=d.allow,
        status=d.status.value,  # type: ignore[arg-type]
        entitlements=[e.value for e in d.entitlements],  # type: ignore[misc]
        source=d.source.value,  # type: ignore[arg-type]
        reason=d.reason,
        gross_fare_fen=d.price.gross_fare_fen,
        charged_fen=d.price.charged_fen,
        concession_fen=d.price.concession_fen,
        applied_entitlement=_applied(d),
        fare_version=d.price.version,
    )


_OUTCOMES = {
    Outcome.ACCEPTED: settlement_pb2.TRIP_OUTCOME_ACCEPTED,
    Outcome.REJECTED: settlement_pb2.TRIP_OUTCOME_REJECTED,
    Outcome.CONFLICT: settlement_pb2.TRIP_OUTCOME_CONFLICT,
}


def trip_from_wire(
    msg: settlement_pb2.TripRecord, operator_id: str, index: int
) -> Trip | Judgement:
    """A valid :class:`Trip`, or the REJECTED judgement naming the malformed field.

    On the ingest path for every trip: field names are only built for errors.
    """
    if msg.operator_id != operator_id:
        return Judgement(
            Outcome.REJECTED,
            Reason.OPERATOR_MISMATCH,
            f"trips[{index}].operator_id differs from the caller certificate's",
        )
    try:
        trip_id = msg.trip_id
        if not trip_id or len(trip_id) > 64 or not trip_id.isprintable():
            raise InvalidArgument("trip_id", "must be 1-64 printable characters")
        card = card_from_wire(msg.card, msg.HasField("card"))
        scene = scene_from_wire(msg.scene)
        if not msg.HasField("occurred_at"):
            raise InvalidArgument("occurred_at", "is required")
        ent = msg.applied_entitlement
        applied = _ENTITLEMENT_OF.get(ent) if ent else None
        if ent and applied is None:
            raise InvalidArgument("applied_entitlement", "is not a known entitlement")
        place, version = msg.place_id, msg.fare_version
        if len(place) > 64 or len(version) > 64:
            raise InvalidArgument("place_id", "place_id and fare_version: at most 64")
        ts = msg.occurred_at
        return Trip(
            operator_id=operator_id,
            trip_id=trip_id,
            card=card,
            scene=scene,
            place_id=place,
            occurred_at=_EPOCH + timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000),
            gross_fare_fen=msg.gross_fare_fen,
            charged_fen=msg.charged_fen,
            concession_fen=msg.concession_fen,
            applied_entitlement=applied,
            fare_version=version,
        )
    except InvalidArgument as exc:
        return Judgement(Outcome.REJECTED, Reason.MALFORMED, f"trips[{index}].{exc}")


def result_to_wire(trip_id: str, j: Judgement | None) -> settlement_pb2.TripResult:
    if j is None:
        return settlement_pb2.TripResult(
            trip_id=trip_id, outcome=settlement_pb2.TRIP_OUTCOME_UNKNOWN, reason="unknown"
        )
    return settlement_pb2.TripResult(
        trip_id=trip_id, outcome=_OUTCOMES[j.outcome], reason=j.reason.value, detail=j.detail
    )


def signed_from_wire(msg: settlement_pb2.SignedDocument) -> Signed:
    if not msg.document or not msg.key_id or not msg.signature:
        raise InvalidArgument("document", "document, key_id and signature are all required")
    return Signed(msg.document, msg.key_id, msg.signature)


def signed_to_wire(signed: Signed) -> settlement_pb2.SignedDocument:
    return settlement_pb2.SignedDocument(
        document=signed.document, key_id=signed.key_id, signature=signed.signature
    )
