"""Settlement wire conversions (broker.settlement.wire): trips in, results and signed documents.

``trip_from_wire`` never raises for a bad line: it answers the REJECTED judgement
naming the field with the line's index, so one bad line never costs the others.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from broker._proto.yikatong.v1 import settlement_pb2, types_pb2
from broker.cards.model import CardRef, DecisionSource, Entitlement, Scene
from broker.core.errors import InvalidArgument
from broker.core.signing import Signed
from broker.settlement.trips import ACCEPT, Judgement, Outcome, Reason, Trip
from broker.settlement.wire import (
    result_to_wire,
    signed_from_wire,
    signed_to_wire,
    trip_from_wire,
    trip_to_wire,
    trips_from_wire,
)

CARD_NUMBER = "C5120210000001"
OCCURRED = datetime(2026, 11, 28, 7, 55, 0, 123456, tzinfo=UTC)


def record(**changes: Any) -> settlement_pb2.TripRecord:
    """A valid wire trip of operator bus-01; ``changes`` set (or, with None, clear) fields."""
    msg = settlement_pb2.TripRecord(
        operator_id="bus-01",
        trip_id="t-000001",
        card=types_pb2.CardRef(issuer_region="512021", card_number=CARD_NUMBER),
        scene=types_pb2.SCENE_BUS,
        place_id="route-3",
        gross_fare_fen=200,
        charged_fen=0,
        concession_fen=200,
        applied_entitlement=types_pb2.ENTITLEMENT_SENIOR_65,
        fare_version="sample-1",
    )
    msg.occurred_at.FromDatetime(OCCURRED)
    for name, value in changes.items():
        if value is None:
            msg.ClearField(name)  # type: ignore[arg-type]
        elif name == "card":
            msg.card.CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg


def rejected(got: Trip | Judgement) -> Judgement:
    assert isinstance(got, Judgement), got
    assert got.outcome is Outcome.REJECTED
    return got


def test_a_valid_trip_becomes_a_trip_with_every_field():
    got = trip_from_wire(record(), "bus-01", 0)
    assert got == Trip(
        operator_id="bus-01",
        trip_id="t-000001",
        card=CardRef("512021", CARD_NUMBER),
        scene=Scene.BUS,
        place_id="route-3",
        occurred_at=OCCURRED,
        gross_fare_fen=200,
        charged_fen=0,
        concession_fen=200,
        applied_entitlement=Entitlement.SENIOR_65,
        fare_version="sample-1",
    )
    assert isinstance(got, Trip) and got.occurred_at.tzinfo is not None


def test_occurred_at_keeps_microseconds_and_drops_finer_nanos():
    msg = record()
    msg.occurred_at.nanos = 123_456_789
    got = trip_from_wire(msg, "bus-01", 0)
    assert isinstance(got, Trip)
    assert got.occurred_at == OCCURRED.replace(microsecond=123_456)


def test_no_applied_entitlement_is_none_and_empty_place_and_version_are_allowed():
    got = trip_from_wire(record(applied_entitlement=0, place_id="", fare_version=""), "bus-01", 0)
    assert isinstance(got, Trip)
    assert got.applied_entitlement is None
    assert (got.place_id, got.fare_version) == ("", "")


def test_ids_places_and_versions_of_64_characters_are_allowed():
    msg = record(trip_id="t" * 64, place_id="p" * 64, fare_version="v" * 64)
    got = trip_from_wire(msg, "bus-01", 0)
    assert isinstance(got, Trip)
    assert (len(got.trip_id), len(got.place_id), len(got.fare_version)) == (64, 64, 64)


def test_lengths_count_characters_not_bytes():
    got = trip_from_wire(record(trip_id="站" * 64, place_id="路" * 64), "bus-01", 0)
    assert isinstance(got, Trip)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"trip_id": ""}, "trip_id"),
        ({"trip_id": "t" * 65}, "trip_id"),
        ({"trip_id": "t-1\n"}, "trip_id"),
        ({"trip_id": "t\x00"}, "trip_id"),
        ({"card": None}, "card"),
        (
            {"card": types_pb2.CardRef(issuer_region="5121", card_number=CARD_NUMBER)},
            "card.issuer_region",
        ),
        (
            {"card": types_pb2.CardRef(issuer_region="512021", card_number="c512021")},
            "card.card_number",
        ),
        ({"card": types_pb2.CardRef(issuer_region="512021", card_number="")}, "card.card_number"),
        ({"scene": 0}, "scene"),
        ({"scene": 99}, "scene"),
        ({"occurred_at": None}, "occurred_at"),
        ({"applied_entitlement": 99}, "applied_entitlement"),
        ({"place_id": "p" * 65}, "place_id"),
        ({"gate_id": "g" * 65}, "gate_id"),
        ({"gate_id": "gate\n3"}, "gate_id"),
        ({"decision_source": 6}, "decision_source"),
        ({"decision_source": -1}, "decision_source"),
    ],
)
def test_each_malformed_field_is_named_with_the_line_index(changes, field):
    got = rejected(trip_from_wire(record(**changes), "bus-01", 3))
    assert got.reason is Reason.MALFORMED
    assert got.detail.startswith(f"trips[3].{field}: ")


def test_a_too_long_fare_version_is_malformed_and_named_in_the_detail():
    got = rejected(trip_from_wire(record(fare_version="v" * 65), "bus-01", 7))
    assert got.reason is Reason.MALFORMED
    assert got.detail.startswith("trips[7].")
    assert "fare_version" in got.detail


def test_a_malformed_card_number_is_never_echoed():
    number = "c5120210000001secret"
    card = types_pb2.CardRef(issuer_region="512021", card_number=number)
    got = rejected(trip_from_wire(record(card=card), "bus-01", 0))
    assert number not in got.detail and number.upper() not in got.detail


def test_another_operators_trip_is_an_operator_mismatch_checked_first():
    got = rejected(trip_from_wire(record(operator_id="bus-02", trip_id=""), "bus-01", 5))
    assert got.reason is Reason.OPERATOR_MISMATCH
    assert got.detail.startswith("trips[5].operator_id")


def test_the_first_malformed_field_is_the_one_named():
    got = rejected(trip_from_wire(record(trip_id="", scene=0, occurred_at=None), "bus-01", 0))
    assert got.detail.startswith("trips[0].trip_id: ")


@pytest.mark.parametrize(
    ("seconds", "nanos", "field"),
    [
        (253_402_300_800, 0, "occurred_at.seconds"),  # 10000-01-01T00:00:00Z
        (-62_135_596_801, 0, "occurred_at.seconds"),  # before year 1
        (2**62, 0, "occurred_at.seconds"),
        (1_700_000_000, -1, "occurred_at.nanos"),
        (1_700_000_000, 2_000_000_000, "occurred_at.nanos"),
    ],
)
def test_an_occurred_at_out_of_range_is_a_malformed_line_naming_the_field(
    seconds: int, nanos: int, field: str
):
    msg = record()
    msg.occurred_at.seconds, msg.occurred_at.nanos = seconds, nanos
    got = rejected(trip_from_wire(msg, "bus-01", 2))
    assert got.reason is Reason.MALFORMED
    assert got.detail.startswith(f"trips[2].{field}: ")


def test_the_ends_of_the_timestamp_range_are_accepted():
    for seconds, nanos in ((253_402_300_799, 999_999_999), (-62_135_596_800, 0)):
        msg = record()
        msg.occurred_at.seconds, msg.occurred_at.nanos = seconds, nanos
        assert isinstance(trip_from_wire(msg, "bus-01", 0), Trip)


def test_a_too_long_fare_version_is_named_as_itself_not_as_place_id():
    got = rejected(trip_from_wire(record(fare_version="v" * 65), "bus-01", 1))
    assert got.detail.startswith("trips[1].fare_version: ")
    got = rejected(trip_from_wire(record(place_id="p" * 65), "bus-01", 1))
    assert got.detail.startswith("trips[1].place_id: ")


def test_an_empty_operator_id_is_required_not_a_mismatch():
    got = rejected(trip_from_wire(record(operator_id=""), "bus-01", 4))
    assert got.reason is Reason.MALFORMED
    assert got.detail == "trips[4].operator_id: is required"


# ---------------------------------------------------------------- results


@pytest.mark.parametrize(
    ("judgement", "wire"),
    [
        (ACCEPT, settlement_pb2.TRIP_OUTCOME_ACCEPTED),
        (
            Judgement(Outcome.REJECTED, Reason.TOO_LATE, "occurred more than 72 h ago"),
            settlement_pb2.TRIP_OUTCOME_REJECTED,
        ),
        (
            Judgement(Outcome.CONFLICT, Reason.DUPLICATE_CONTENT_DIFFERS, "other content"),
            settlement_pb2.TRIP_OUTCOME_CONFLICT,
        ),
    ],
)
def test_each_outcome_goes_out_with_its_reason_code_and_detail(judgement, wire):
    msg = result_to_wire("t-9", judgement)
    assert msg.trip_id == "t-9"
    assert msg.outcome == wire
    assert msg.reason == judgement.reason.value
    assert msg.detail == judgement.detail


def test_every_outcome_has_a_wire_value_of_the_same_name():
    for outcome in Outcome:
        msg = result_to_wire("t", Judgement(outcome, Reason.OK))
        assert settlement_pb2.TripOutcome.Name(msg.outcome) == f"TRIP_OUTCOME_{outcome.name}"


def test_no_stored_outcome_is_unknown():
    msg = result_to_wire("t-404", None)
    assert msg.trip_id == "t-404"
    assert msg.outcome == settlement_pb2.TRIP_OUTCOME_UNKNOWN
    assert msg.reason == "unknown" and msg.detail == ""


# ---------------------------------------------------------------- signed documents


SIGNED = Signed(b'{"type":"ack"}', "0123456789abcdef", bytes(range(64)))


def test_a_signed_document_round_trips_through_the_wire_bytes():
    data = signed_to_wire(SIGNED).SerializeToString()
    back = signed_from_wire(settlement_pb2.SignedDocument.FromString(data))
    assert back == SIGNED


@pytest.mark.parametrize("missing", ["document", "key_id", "signature"])
def test_a_signed_document_needs_all_three_parts(missing):
    msg = signed_to_wire(SIGNED)
    msg.ClearField(missing)
    with pytest.raises(InvalidArgument) as info:
        signed_from_wire(msg)
    assert info.value.field == "document"
    assert "document, key_id and signature" in info.value.reason


def test_an_empty_signed_document_is_refused():
    with pytest.raises(InvalidArgument):
        signed_from_wire(settlement_pb2.SignedDocument())


def test_a_gate_id_is_carried_and_one_of_64_characters_is_allowed():
    got = trip_from_wire(record(gate_id="闸" * 64), "bus-01", 0)
    assert isinstance(got, Trip)
    assert got.gate_id == "闸" * 64


def test_a_trip_without_a_gate_id_has_an_empty_one():
    """Clients of the previous release send no gate id: their trips are valid without one."""
    got = trip_from_wire(record(), "bus-01", 0)
    assert isinstance(got, Trip)
    assert got.gate_id == ""


@pytest.mark.parametrize("source", list(DecisionSource))
def test_a_decision_source_is_carried_and_none_sent_is_none(source: DecisionSource):
    got = trip_from_wire(record(decision_source=source.value), "bus-01", 0)
    assert isinstance(got, Trip) and got.decision_source is source
    plain = trip_from_wire(record(), "bus-01", 0)  # the previous release's operators
    assert isinstance(plain, Trip) and plain.decision_source is None


def test_a_trip_goes_to_the_wire_and_back_unchanged():
    """trip_to_wire (operators' tools, tests, benchmarks) is trip_from_wire's inverse."""
    msg = record(gate_id="g-7", decision_source=types_pb2.DECISION_SOURCE_OFFLINE_POLICY)
    back = trip_from_wire(msg, "bus-01", 0)
    assert isinstance(back, Trip)
    assert trip_to_wire(back) == msg
    assert trip_from_wire(trip_to_wire(back), "bus-01", 0) == back


def test_results_are_encoded_in_order_with_unknown_for_none():
    from broker.settlement.wire import results_to_wire

    raw = results_to_wire(["a", "b"], [ACCEPT, None])
    got = settlement_pb2.SubmitTripsResponse.FromString(raw).results
    assert [(r.trip_id, r.outcome, r.reason) for r in got] == [
        ("a", settlement_pb2.TRIP_OUTCOME_ACCEPTED, "ok"),
        ("b", settlement_pb2.TRIP_OUTCOME_UNKNOWN, "unknown"),
    ]
    with pytest.raises(ValueError):
        results_to_wire(["a"], [])


def test_the_fast_path_checks_what_the_cards_module_checks():
    from broker.cards import model
    from broker.settlement import wire

    assert wire._REGION_OK.__self__.pattern == model._REGION_RE.pattern  # type: ignore[attr-defined]
    assert wire._NUMBER_OK.__self__.pattern == model._CARD_RE.pattern  # type: ignore[attr-defined]


VARIANTS: list[dict[str, Any]] = [
    {},
    {"gate_id": "g-7"},
    {"gate_id": "g\x07"},
    {"gate_id": "g" * 65},
    {"operator_id": ""},
    {"operator_id": "someone-else"},
    {"trip_id": ""},
    {"trip_id": "t" * 65},
    {"trip_id": "t\n1"},
    {"card": None},
    {"card": types_pb2.CardRef(issuer_region="912021", card_number=CARD_NUMBER)},
    {"card": types_pb2.CardRef(issuer_region="512021", card_number="c5120210000001")},
    {"card": types_pb2.CardRef(issuer_region="512021", card_number="C51")},
    {"scene": 0},
    {"scene": 99},
    {"scene": types_pb2.SCENE_LIBRARY},
    {"occurred_at": None},
    {"applied_entitlement": 0},
    {"applied_entitlement": 77},
    {"place_id": "p" * 65},
    {"fare_version": "v" * 65},
    {"place_id": "路线-3", "fare_version": "v\x01"},
    {"gross_fare_fen": -5, "charged_fen": 10**12},
    {"decision_source": types_pb2.DECISION_SOURCE_STALE},
    {"decision_source": types_pb2.DECISION_SOURCE_OFFLINE_POLICY, "gate_id": "g-1"},
    {"decision_source": 9},
]


def test_trips_from_wire_answers_what_trip_from_wire_answers_for_each_record():
    """The fast path takes a record only when trip_from_wire would make the same trip of it;
    every other record gets trip_from_wire's own answer, its index in place."""
    records = [
        record(trip_id=f"t-{i}", **v) if "trip_id" not in v else record(**v)
        for i, v in enumerate(VARIANTS)
    ]
    timed = []
    for seconds, nanos in [
        (0, 0),
        (-1, 0),
        (-62_135_596_801, 0),
        (253_402_300_800, 0),
        (5, -1),
        (5, 10**9),
        (1_764_316_500, 999_999_999),
    ]:
        msg = record(trip_id=f"ts-{seconds}-{nanos}")
        msg.occurred_at.seconds, msg.occurred_at.nanos = seconds, nanos
        timed.append(msg)
    records += timed
    got = trips_from_wire(records, "bus-01")
    expected = [trip_from_wire(m, "bus-01", i) for i, m in enumerate(records)]
    assert got == expected
    assert sum(isinstance(t, Trip) for t in got) >= 8  # both paths were taken
    assert trips_from_wire(records, "") == [trip_from_wire(m, "", i) for i, m in enumerate(records)]
