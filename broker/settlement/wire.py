"""Trips, trip outcomes and signed settlement documents on the wire (yikatong.v1) and back.

Each package converts its own concepts (``cards.wire``, ``gate.wire``, this
module); the rules themselves never see a protobuf message.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from broker._proto.yikatong.v1 import settlement_pb2
from broker.cards.model import Entitlement
from broker.cards.wire import card_from_wire, card_to_wire, scene_from_wire
from broker.core.errors import InvalidArgument
from broker.core.signing import Signed
from broker.settlement.trips import Judgement, Outcome, Reason, Trip

_ENTITLEMENT_OF = {e.value: e for e in Entitlement}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
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
    if not msg.operator_id:
        return Judgement(
            Outcome.REJECTED, Reason.MALFORMED, f"trips[{index}].operator_id: is required"
        )
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
        if len(place) > 64:
            raise InvalidArgument("place_id", "must be at most 64 characters")
        if len(version) > 64:
            raise InvalidArgument("fare_version", "must be at most 64 characters")
        gate = msg.gate_id  # optional: "" when the operator's gates send none
        if len(gate) > 64 or not gate.isprintable():
            raise InvalidArgument("gate_id", "must be at most 64 printable characters")
        return Trip(
            operator_id=operator_id,
            trip_id=trip_id,
            card=card,
            scene=scene,
            place_id=place,
            occurred_at=_instant(msg.occurred_at.seconds, msg.occurred_at.nanos),
            gross_fare_fen=msg.gross_fare_fen,
            charged_fen=msg.charged_fen,
            concession_fen=msg.concession_fen,
            applied_entitlement=applied,
            fare_version=version,
            gate_id=gate,
        )
    except InvalidArgument as exc:
        return Judgement(Outcome.REJECTED, Reason.MALFORMED, f"trips[{index}].{exc}")


# google.protobuf.Timestamp's own range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799


def _instant(seconds: int, nanos: int) -> datetime:
    if not _MIN_SECONDS <= seconds <= _MAX_SECONDS:
        raise InvalidArgument("occurred_at.seconds", "must be within years 1 to 9999")
    if not 0 <= nanos <= 999_999_999:
        raise InvalidArgument("occurred_at.nanos", "must be from 0 to 999999999")
    return _EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)


def result_to_wire(trip_id: str, j: Judgement | None) -> settlement_pb2.TripResult:
    if j is None:
        return settlement_pb2.TripResult(
            trip_id=trip_id, outcome=settlement_pb2.TRIP_OUTCOME_UNKNOWN, reason="unknown"
        )
    return settlement_pb2.TripResult(
        trip_id=trip_id, outcome=_OUTCOMES[j.outcome], reason=j.reason.value, detail=j.detail
    )


def trip_to_wire(t: Trip) -> settlement_pb2.TripRecord:
    """A trip as an operator sends it (operators' tools, tests, benchmarks)."""
    entitlement = t.applied_entitlement.value if t.applied_entitlement else 0
    msg = settlement_pb2.TripRecord(
        operator_id=t.operator_id,
        trip_id=t.trip_id,
        card=card_to_wire(t.card),
        scene=t.scene.value,  # type: ignore[arg-type]
        place_id=t.place_id,
        gross_fare_fen=t.gross_fare_fen,
        charged_fen=t.charged_fen,
        concession_fen=t.concession_fen,
        applied_entitlement=entitlement,  # type: ignore[arg-type]
        fare_version=t.fare_version,
        gate_id=t.gate_id,
    )
    msg.occurred_at.FromDatetime(t.occurred_at)
    return msg


def results_to_wire(trip_ids: Sequence[str], verdicts: Sequence[Judgement | None]) -> bytes:
    """A serialized ``SubmitTripsResponse``: one result per trip id, in order."""
    return settlement_pb2.SubmitTripsResponse(
        results=[result_to_wire(t, j) for t, j in zip(trip_ids, verdicts, strict=True)]
    ).SerializeToString()


def signed_from_wire(msg: settlement_pb2.SignedDocument) -> Signed:
    if not msg.document or not msg.key_id or not msg.signature:
        raise InvalidArgument("document", "document, key_id and signature are all required")
    return Signed(msg.document, msg.key_id, msg.signature)


def signed_to_wire(signed: Signed) -> settlement_pb2.SignedDocument:
    return settlement_pb2.SignedDocument(
        document=signed.document, key_id=signed.key_id, signature=signed.signature
    )
