"""Gate decisions on the wire (yikatong.v1.GateDecision)."""

from __future__ import annotations

from broker._proto.yikatong.v1 import gate_pb2, types_pb2
from broker.gate.decision import Decision


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
        verified=d.verified,
    )
