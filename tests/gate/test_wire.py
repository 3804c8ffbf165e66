"""Gate decisions on the wire (broker.gate.wire.decision_to_wire): every field of GateDecision."""

from __future__ import annotations

from dataclasses import replace

import pytest

from broker._proto.yikatong.v1 import gate_pb2, types_pb2
from broker.cards.model import CardStatus, DecisionSource, Entitlement, Recognition
from broker.fares.rules import Price
from broker.gate.decision import decide, offline
from broker.gate.wire import decision_to_wire

E = Entitlement
FREE_RIDE = Price(200, 0, 200, E.SENIOR_65, "senior-bus-free", "2026.11")
FULL_FARE = Price(200, 200, 0, None, None, "2026.11")


def test_an_allowed_priced_decision_carries_every_field():
    """allow, status, entitlements (in order), source, reason and the five price fields."""
    d = replace(
        decide(
            Recognition(CardStatus.ACTIVE, (E.SENIOR_60, E.SENIOR_65, E.DISABLED), 120),
            DecisionSource.PEER,
        ),
        price=FREE_RIDE,
    )
    msg = decision_to_wire(d)
    assert msg.allow is True
    assert msg.status == types_pb2.CARD_STATUS_ACTIVE
    assert list(msg.entitlements) == [
        types_pb2.ENTITLEMENT_SENIOR_60,
        types_pb2.ENTITLEMENT_SENIOR_65,
        types_pb2.ENTITLEMENT_DISABLED,
    ]
    assert msg.source == types_pb2.DECISION_SOURCE_PEER
    assert msg.reason == d.reason and msg.reason
    assert (msg.gross_fare_fen, msg.charged_fen, msg.concession_fen) == (200, 0, 200)
    assert msg.applied_entitlement == types_pb2.ENTITLEMENT_SENIOR_65
    assert msg.fare_version == "2026.11"


def test_applied_entitlement_is_unspecified_when_no_concession_applied():
    """A full fare: applied_entitlement 0 (ENTITLEMENT_UNSPECIFIED), the version still sent."""
    d = replace(
        decide(Recognition(CardStatus.ACTIVE, (), 120), DecisionSource.HOME), price=FULL_FARE
    )
    msg = decision_to_wire(d)
    assert msg.applied_entitlement == 0 == types_pb2.ENTITLEMENT_UNSPECIFIED
    assert (msg.gross_fare_fen, msg.charged_fen, msg.concession_fen) == (200, 200, 0)
    assert msg.fare_version == "2026.11"
    assert list(msg.entitlements) == []


def test_an_offline_refusal_on_the_wire():
    """Refused, UNKNOWN, OFFLINE_POLICY, the reason, and every price field zero or empty."""
    msg = decision_to_wire(offline("district 512021: did not answer within 300 ms"))
    assert msg.allow is False
    assert msg.status == types_pb2.CARD_STATUS_UNKNOWN
    assert msg.source == types_pb2.DECISION_SOURCE_OFFLINE_POLICY
    assert msg.reason == "district 512021: did not answer within 300 ms"
    assert (msg.gross_fare_fen, msg.charged_fen, msg.concession_fen) == (0, 0, 0)
    assert (msg.applied_entitlement, msg.fare_version) == (0, "")
    assert msg.verified is False
    assert decision_to_wire(
        decide(Recognition(CardStatus.ACTIVE, (), 1), DecisionSource.PEER)
    ).verified


@pytest.mark.parametrize("source", list(DecisionSource))
def test_every_source_keeps_its_wire_name(source: DecisionSource):
    """DecisionSource.X becomes DECISION_SOURCE_X on the wire."""
    msg = decision_to_wire(decide(Recognition(CardStatus.ACTIVE, (), 1), source))
    assert types_pb2.DecisionSource.Name(msg.source) == f"DECISION_SOURCE_{source.name}"


@pytest.mark.parametrize("status", list(CardStatus))
def test_every_status_keeps_its_wire_name(status: CardStatus):
    """CardStatus.X becomes CARD_STATUS_X, with allow true exactly for ACTIVE."""
    msg = decision_to_wire(decide(Recognition(status, (), 1), DecisionSource.PEER))
    assert types_pb2.CardStatus.Name(msg.status) == f"CARD_STATUS_{status.name}"
    assert msg.allow is (status is CardStatus.ACTIVE)


@pytest.mark.parametrize("ent", list(Entitlement))
def test_every_applied_entitlement_keeps_its_wire_name(ent: Entitlement):
    """Price.applied_entitlement X becomes ENTITLEMENT_X, never 0 when one applied."""
    price = Price(100, 0, 100, ent, "s", "v")
    d = replace(decide(Recognition(CardStatus.ACTIVE, (ent,), 1), DecisionSource.HOME), price=price)
    msg = decision_to_wire(d)
    assert types_pb2.Entitlement.Name(msg.applied_entitlement) == f"ENTITLEMENT_{ent.name}"
    assert msg.applied_entitlement != 0


def test_the_message_survives_serialisation():
    """What the gate receives parses back to the same decision message."""
    d = replace(
        decide(Recognition(CardStatus.ACTIVE, (E.STUDENT,), 120), DecisionSource.CACHE),
        price=Price(300, 250, 50, E.STUDENT, "student-bus", "2026.11"),
    )
    msg = decision_to_wire(d)
    again = gate_pb2.GateDecision.FromString(msg.SerializeToString())
    assert again == msg
    assert again.charged_fen + again.concession_fen == again.gross_fare_fen
