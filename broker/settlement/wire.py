"""Trips, trip outcomes and signed settlement documents on the wire (yikatong.v1) and back.

Each package converts its own concepts (``cards.wire``, ``gate.wire``, this
module); the rules themselves never see a protobuf message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from broker._proto.yikatong.v1 import settlement_pb2
from broker.cards.model import CardRef, DecisionSource, Entitlement, Scene
from broker.cards.wire import (
    TIMESTAMP_MAX_S,
    card_from_wire,
    card_to_wire,
    instant_from_wire,
    scene_from_wire,
)
from broker.core.errors import InvalidArgument
from broker.core.signing import Signed
from broker.settlement.trips import Judgement, Outcome, Reason, Trip

_ENTITLEMENT_OF = {e.value: e for e in Entitlement}
_SOURCE_OF = {s.value: s for s in DecisionSource}
# What card_ref and scene_from_wire accept (broker.cards), for the fast path below.
_REGION_OK = re.compile(r"[1-8][0-9]{5}").fullmatch
_NUMBER_OK = re.compile(r"[0-9A-Z]{6,20}").fullmatch
_SCENE_OF = {s.value: s for s in Scene if s is not Scene.UNSPECIFIED}
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
        given = msg.decision_source  # optional: UNSPECIFIED when the operator sends none
        source = _SOURCE_OF.get(given) if given else None
        if given and source is None:
            raise InvalidArgument("decision_source", "is not a known decision source")
        return Trip(
            operator_id=operator_id,
            trip_id=trip_id,
            card=card,
            scene=scene,
            place_id=place,
            occurred_at=instant_from_wire(
                msg.occurred_at.seconds, msg.occurred_at.nanos, "occurred_at"
            ),
            gross_fare_fen=msg.gross_fare_fen,
            charged_fen=msg.charged_fen,
            concession_fen=msg.concession_fen,
            applied_entitlement=applied,
            fare_version=version,
            gate_id=gate,
            decision_source=source,
        )
    except InvalidArgument as exc:
        return Judgement(Outcome.REJECTED, Reason.MALFORMED, f"trips[{index}].{exc}")


def trips_from_wire(
    records: Iterable[settlement_pb2.TripRecord], operator_id: str
) -> list[Trip | Judgement]:
    """:func:`trip_from_wire` of each record, its index its place: a valid trip is taken on a
    path that checks the same things faster; any record that path is unsure of (anything
    to refuse, or rare) goes through :func:`trip_from_wire`, which answers it."""
    out: list[Trip | Judgement] = []
    append = out.append
    regions: set[str] = set()  # issuer regions seen valid in this request
    for index, msg in enumerate(records):
        trip = _valid_trip(msg, operator_id, regions) if operator_id else None
        append(trip if trip is not None else trip_from_wire(msg, operator_id, index))
    return out


def _valid_trip(msg: settlement_pb2.TripRecord, operator_id: str, regions: set[str]) -> Trip | None:
    """The trip :func:`trip_from_wire` would make of ``msg``, or None if it might not make one."""
    if msg.operator_id != operator_id or not msg.HasField("card"):
        return None
    trip_id = msg.trip_id
    if not trip_id or len(trip_id) > 64 or not trip_id.isprintable():
        return None
    wire_card = msg.card
    region, number = wire_card.issuer_region, wire_card.card_number
    if region not in regions:
        if not _REGION_OK(region):
            return None
        regions.add(region)
    if not _NUMBER_OK(number):
        return None
    scene = _SCENE_OF.get(msg.scene)
    if scene is None or not msg.HasField("occurred_at"):
        return None
    ent = msg.applied_entitlement
    applied = _ENTITLEMENT_OF.get(ent) if ent else None
    if ent and applied is None:
        return None
    place, version, gate = msg.place_id, msg.fare_version, msg.gate_id
    if len(place) > 64 or len(version) > 64 or len(gate) > 64 or not gate.isprintable():
        return None
    given = msg.decision_source
    source = _SOURCE_OF.get(given) if given else None
    if given and source is None:
        return None
    at = msg.occurred_at
    seconds, nanos = at.seconds, at.nanos
    if not (0 <= seconds <= TIMESTAMP_MAX_S and 0 <= nanos <= 999_999_999):
        return None  # before 1970 (rare) or out of range: the slow path says which
    return Trip(
        operator_id,
        trip_id,
        CardRef(region, number),
        scene,
        place,
        _EPOCH + timedelta(0, seconds, nanos // 1000),
        msg.gross_fare_fen,
        msg.charged_fen,
        msg.concession_fen,
        applied,
        version,
        gate,
        source,
    )


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
        decision_source=(t.decision_source.value if t.decision_source else 0),  # type: ignore[arg-type]
    )
    msg.occurred_at.FromDatetime(t.occurred_at)
    return msg


def results_to_wire(trip_ids: Sequence[str], verdicts: Sequence[Judgement | None]) -> bytes:
    """A serialized ``SubmitTripsResponse``: one result per trip id, in order (as
    :func:`result_to_wire` makes each, added in place: no message per result to copy)."""
    if len(trip_ids) != len(verdicts):
        raise ValueError("one verdict per trip id")
    response = settlement_pb2.SubmitTripsResponse()
    add = response.results.add
    fields: dict[Judgement | None, dict[str, Any]] = {}
    for trip_id, j in zip(trip_ids, verdicts, strict=True):
        known = fields.get(j)
        if known is None:
            known = fields[j] = _result_fields(j)
        add(trip_id=trip_id, **known)
    return response.SerializeToString()


def _result_fields(j: Judgement | None) -> dict[str, Any]:
    if j is None:
        return {"outcome": settlement_pb2.TRIP_OUTCOME_UNKNOWN, "reason": "unknown"}
    return {"outcome": _OUTCOMES[j.outcome], "reason": j.reason.value, "detail": j.detail}


def signed_from_wire(msg: settlement_pb2.SignedDocument) -> Signed:
    if not msg.document or not msg.key_id or not msg.signature:
        raise InvalidArgument("document", "document, key_id and signature are all required")
    return Signed(msg.document, msg.key_id, msg.signature)


def signed_to_wire(signed: Signed) -> settlement_pb2.SignedDocument:
    return settlement_pb2.SignedDocument(
        document=signed.document, key_id=signed.key_id, signature=signed.signature
    )
