"""The gate decision (broker.gate.decision): allowed exactly when ACTIVE; offline refusal; enum."""

from __future__ import annotations

import dataclasses
import re

import pytest

from broker._proto.yikatong.v1 import types_pb2
from broker.cards.model import CardStatus, DecisionSource, Entitlement, Recognition
from broker.fares.rules import NO_FARE
from broker.gate.decision import ALLOW_STANDARD_FARE, DENY, Decision, decide, offline

ALL_ENTS = tuple(Entitlement)
# A card number is 6-20 characters of [0-9A-Z]; a reason must hold no such run.
CARD_NUMBER_LIKE = re.compile(r"[0-9A-Z]{6,}")


@pytest.mark.parametrize("status", list(CardStatus))
def test_allow_exactly_when_active(status: CardStatus) -> None:
    """Only an ACTIVE card passes; every other status is refused."""
    d = decide(Recognition(status, (), 60), DecisionSource.PEER)
    assert d.allow is (status is CardStatus.ACTIVE)
    assert d.status is status


def test_an_active_card_keeps_its_entitlements_in_order() -> None:
    """The home district's entitlements reach the gate unchanged for an ACTIVE card."""
    ents = (Entitlement.SENIOR_60, Entitlement.SENIOR_65, Entitlement.DISABLED)
    d = decide(Recognition(CardStatus.ACTIVE, ents, 60), DecisionSource.HOME)
    assert d.entitlements == ents


def test_an_active_card_without_entitlements_still_passes() -> None:
    """An empty entitlement set is no reason to refuse (a plain fare-paying holder)."""
    d = decide(Recognition(CardStatus.ACTIVE, (), 60), DecisionSource.HOME)
    assert d.allow is True and d.entitlements == ()


@pytest.mark.parametrize("status", [s for s in CardStatus if s is not CardStatus.ACTIVE])
def test_a_refused_card_gets_no_entitlements_even_if_the_answer_carried_some(
    status: CardStatus,
) -> None:
    """A malformed peer answer (entitlements on a LOST card…) must not grant concessions."""
    d = decide(Recognition(status, ALL_ENTS, 60), DecisionSource.PEER)
    assert d.allow is False
    assert d.entitlements == ()


@pytest.mark.parametrize("source", list(DecisionSource))
def test_the_source_is_carried_through(source: DecisionSource) -> None:
    """decide() records where the answer came from, for every source."""
    assert decide(Recognition(CardStatus.ACTIVE, (), 1), source).source is source


def test_each_status_has_its_own_reason_free_of_card_numbers() -> None:
    """Reasons tell the statuses apart and never hold anything shaped like a card number."""
    reasons = {s: decide(Recognition(s, (), 1), DecisionSource.PEER).reason for s in CardStatus}
    assert len(set(reasons.values())) == len(CardStatus)
    for status, reason in reasons.items():
        assert reason.strip(), status
        assert CARD_NUMBER_LIKE.search(reason) is None, (status, reason)


def test_a_decision_carries_no_fare_until_priced() -> None:
    """decide() leaves pricing to the gate service: the price is NO_FARE."""
    d = decide(Recognition(CardStatus.ACTIVE, (Entitlement.STUDENT,), 1), DecisionSource.HOME)
    assert d.price == NO_FARE
    assert (d.price.gross_fare_fen, d.price.charged_fen, d.price.version) == (0, 0, "")


def test_the_ttl_of_the_answer_does_not_affect_the_decision() -> None:
    """A zero (uncacheable) TTL still yields the same decision as a long one."""
    short = decide(Recognition(CardStatus.ACTIVE, (Entitlement.SENIOR_70,), 0), DecisionSource.PEER)
    long = decide(
        Recognition(CardStatus.ACTIVE, (Entitlement.SENIOR_70,), 3600), DecisionSource.PEER
    )
    assert short == long


def test_offline_refuses_with_unknown_status_and_the_given_reason() -> None:
    """The offline policy: refuse, UNKNOWN, no entitlements, source OFFLINE_POLICY, no fare."""
    d = offline("district 512021: did not answer within 300 ms")
    assert d == Decision(
        allow=False,
        status=CardStatus.UNKNOWN,
        entitlements=(),
        source=DecisionSource.OFFLINE_POLICY,
        reason="district 512021: did not answer within 300 ms",
        price=NO_FARE,
        verified=False,
    )


def test_a_scene_that_allows_at_the_standard_fare_lets_an_unverified_card_through():
    d = offline("district 512021: away", ALLOW_STANDARD_FARE)
    assert (d.allow, d.verified, d.status, d.entitlements) == (True, False, CardStatus.UNKNOWN, ())
    assert d.source is DecisionSource.OFFLINE_POLICY
    assert not offline("x", DENY).allow
    with pytest.raises(ValueError, match="offline policy"):
        offline("x", "allow")


def test_offline_keeps_an_empty_reason_as_given() -> None:
    """offline() does not invent or substitute a reason."""
    assert offline("").reason == ""
    assert offline("").allow is False


def test_a_decision_is_immutable() -> None:
    """A decision handed to the wire layer cannot be changed afterwards."""
    d = offline("x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.allow = True  # type: ignore[misc]


def test_source_values_equal_the_wire_enum() -> None:
    """Every DecisionSource is the same number as DECISION_SOURCE_<NAME> on the wire, and back."""
    wire = types_pb2.DecisionSource
    for source in DecisionSource:
        assert wire.Value(f"DECISION_SOURCE_{source.name}") == source.value
    named = {name.removeprefix("DECISION_SOURCE_") for name, _ in wire.items()} - {"UNSPECIFIED"}
    assert named == {s.name for s in DecisionSource}
    assert 0 not in {s.value for s in DecisionSource}  # 0 is UNSPECIFIED on the wire
