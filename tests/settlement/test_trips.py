"""Trips: each judged on its own; the first problem found is the reason.

Storing judged trips is tested beside the ledger (tests/settlement/ledger/).
"""

from __future__ import annotations

import dataclasses
import hashlib
import tomllib
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pytest

from broker.cards.model import CardRef, DecisionSource, Entitlement, Scene
from broker.fares.rules import FareSchedule, parse_fares
from broker.settlement.trips import CORRECTABLE, Judge, Outcome, Reason, Trip, judge
from broker.testbed.build import SAMPLE_FARES

NOW = datetime(2026, 11, 28, 8, 0, tzinfo=UTC)
FARES = parse_fares(tomllib.loads('district = "500111"\n' + SAMPLE_FARES))
KNOWN = frozenset({"500111", "512021", "500153"})


def trip(n: int = 1, **changes) -> Trip:
    base = Trip(
        "bus-01",
        f"t-{n:06d}",
        CardRef("512021", "C5120210000001"),
        Scene.BUS,
        "",
        NOW - timedelta(minutes=5),
        200,
        0,
        200,
        Entitlement.SENIOR_65,
        "sample-1",
    )
    return replace(base, **changes)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({}, Reason.OK),
        ({"card": CardRef("500118", "C5001180000001")}, Reason.UNKNOWN_DISTRICT),
        ({"charged_fen": 10}, Reason.BAD_AMOUNTS),
        ({"charged_fen": -200, "concession_fen": 400}, Reason.BAD_AMOUNTS),
        (
            {"gross_fare_fen": 10**12, "charged_fen": 10**12, "concession_fen": 0},
            Reason.BAD_AMOUNTS,
        ),
        ({"occurred_at": NOW + timedelta(hours=1)}, Reason.IN_FUTURE),
        ({"occurred_at": NOW - timedelta(hours=72, seconds=1)}, Reason.TOO_LATE),
        ({"fare_version": "never-published"}, Reason.UNKNOWN_FARE_VERSION),
        ({"gross_fare_fen": 300, "concession_fen": 300}, Reason.PRICE_MISMATCH),
        ({"decision_source": DecisionSource.STALE}, Reason.OK),
        ({"decision_source": DecisionSource.OFFLINE_POLICY}, Reason.OFFLINE_CONCESSION),
        (
            {
                "decision_source": DecisionSource.OFFLINE_POLICY,
                "applied_entitlement": None,
                "charged_fen": 200,
                "concession_fen": 0,
            },
            Reason.OK,  # an offline trip at the standard fare
        ),
        (
            {
                "decision_source": DecisionSource.OFFLINE_POLICY,
                "applied_entitlement": None,
                "charged_fen": 100,
                "concession_fen": 100,
            },
            Reason.OFFLINE_CONCESSION,  # a concession with no entitlement named: still none
        ),
    ],
)
def test_each_trip_is_judged_on_its_own(changes, reason):
    verdict = judge(trip(**changes), NOW, KNOWN, FARES)
    assert verdict.reason is reason
    assert verdict.outcome is (Outcome.ACCEPTED if reason is Reason.OK else Outcome.REJECTED)


def test_late_window_edges():
    edge = judge(trip(occurred_at=NOW - timedelta(hours=72)), NOW, KNOWN, FARES)
    assert edge.outcome is Outcome.ACCEPTED
    skew = judge(trip(occurred_at=NOW + timedelta(minutes=4)), NOW, KNOWN, FARES)
    assert skew.outcome is Outcome.ACCEPTED  # clocks at gates drift a little


# ---------------------------------------------------------------- the fare version in force


def week_of_two_tables() -> FareSchedule:
    """sample-1 from 2026-11-01; sample-2, a dearer bus, from 2026-11-25 (Shanghai days)."""
    old = FARES.tables[0]
    new = replace(
        old,
        version="sample-2",
        effective_from=date(2026, 11, 25),
        rules=tuple(replace(r, gross_fare_fen=r.gross_fare_fen + 50) for r in old.rules),
    )
    return FareSchedule(FARES.district, (old, new))


CHANGE = datetime(2026, 11, 24, 16, 0, tzinfo=UTC)  # 2026-11-25 00:00 in Shanghai


@pytest.mark.parametrize(
    ("after_change", "version", "accepted"),
    [
        (timedelta(hours=3), "sample-2", True),  # the table in force
        (timedelta(hours=3), "sample-1", False),  # an older, cheaper one: not any more
        (timedelta(minutes=9, seconds=59), "sample-1", True),  # a gate's clock a bit behind
        (timedelta(minutes=10, seconds=1), "sample-1", False),  # past the grace
        (-timedelta(minutes=1), "sample-2", False),  # not yet in force
        (-timedelta(minutes=1), "sample-1", True),
    ],
)
def test_a_trip_must_be_priced_by_the_table_in_force_when_it_occurred(
    after_change: timedelta, version: str, accepted: bool
):
    schedule = week_of_two_tables()
    at = CHANGE + after_change
    gross = 250 if version == "sample-2" else 200
    t = trip(
        occurred_at=at,
        fare_version=version,
        gross_fare_fen=gross,
        charged_fen=gross,
        concession_fen=0,
        applied_entitlement=None,
    )
    verdict = judge(
        t, at + timedelta(minutes=1), KNOWN, schedule, changeover_grace=timedelta(seconds=600)
    )
    if accepted:
        assert verdict.reason is Reason.OK, verdict
    else:
        assert verdict.reason is Reason.UNKNOWN_FARE_VERSION
        assert "were not in force at" in verdict.detail


def test_no_grace_means_the_new_table_from_midnight_exactly():
    schedule = week_of_two_tables()
    assert not schedule.in_force("sample-1", CHANGE + timedelta(seconds=1), timedelta(0))
    assert schedule.in_force("sample-1", CHANGE - timedelta(seconds=1), timedelta(0))
    assert schedule.in_force("sample-2", CHANGE, timedelta(0))


def test_a_trip_without_a_gate_id_keeps_the_digest_the_previous_release_stored():
    """The previous release hashed these twelve fields; its stored digests must still match."""
    t = trip()
    fields = ["bus-01", "t-000001", "512021", "C5120210000001", "1", ""]
    fields += [t.occurred_at.isoformat(), "200", "0", "200", "2", "sample-1"]
    assert t.digest() == hashlib.sha256("\x00".join(fields).encode()).hexdigest()
    assert trip(gate_id="gate-3").digest() != t.digest()
    assert trip(gate_id="gate-3").digest() != trip(gate_id="gate-4").digest()


def test_the_presentment_digest_is_who_which_card_where_when_and_at_which_gate():
    t = trip(gate_id="gate-3")
    for change in (
        {"operator_id": "bus-02"},
        {"trip_id": "t-000002"},
        {"card": CardRef("512021", "C5120210000002")},
        {"card": CardRef("500153", "C5120210000001")},
        {"scene": Scene.MUSEUM},
        {"place_id": "route-9"},
        {"occurred_at": t.occurred_at + timedelta(seconds=1)},
        {"gate_id": "gate-4"},
        {"gate_id": ""},
    ):
        assert replace(t, **change).presentment_digest() != t.presentment_digest(), change
    # What a dispute can be about leaves it as it was; so does the instant's time zone.
    corrected = replace(
        t,
        applied_entitlement=None,
        gross_fare_fen=300,
        charged_fen=300,
        concession_fen=0,
        fare_version="sample-2",
        occurred_at=t.occurred_at.astimezone(timezone(timedelta(hours=8))),
    )
    assert corrected.presentment_digest() == t.presentment_digest()


def test_every_field_is_either_correctable_or_in_the_presentment_digest():
    identity = {
        "operator_id",
        "trip_id",
        "card",
        "scene",
        "place_id",
        "occurred_at",
        "gate_id",
        "decision_source",
    }
    fields = {f.name for f in dataclasses.fields(Trip)}
    assert CORRECTABLE | identity == fields and not CORRECTABLE & identity


def test_every_reason_code_is_listed_in_the_wire_contract():
    proto = Path(__file__).resolve().parents[2] / "proto" / "yikatong" / "v1" / "settlement.proto"
    result = proto.read_text().split("message TripResult", 1)[1]
    listed = result.split("string reason = 3;", 1)[0]
    assert [r.value for r in Reason if r.value not in listed] == []


def reference_digest(t: Trip) -> str:
    """The digest as the release before the fast one wrote it: fields joined by NUL."""
    fields = [
        t.operator_id,
        t.trip_id,
        t.card.issuer_region,
        t.card.card_number,
        str(t.scene.value),
        t.place_id,
        t.occurred_at.isoformat(),
        str(t.gross_fare_fen),
        str(t.charged_fen),
        str(t.concession_fen),
        str(t.applied_entitlement.value if t.applied_entitlement else 0),
        t.fare_version,
        *((t.gate_id,) if t.gate_id else ()),
    ]
    return hashlib.sha256("\x00".join(fields).encode()).hexdigest()


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"gate_id": "g-7"},
        {"applied_entitlement": None, "charged_fen": 200, "concession_fen": 0},
        {"occurred_at": NOW.replace(microsecond=123456)},
        {"occurred_at": NOW.astimezone(timezone(timedelta(hours=8)))},  # the same instant
        {"scene": Scene.LIBRARY, "place_id": "路线-3", "fare_version": "v\x01"},
        {"gross_fare_fen": 10**12, "charged_fen": -1, "concession_fen": 0},
    ],
)
def test_the_digest_is_the_one_stored_before(changes):
    t = trip(**changes)
    assert t.digest() == reference_digest(t)


def test_one_judge_for_many_trips_answers_as_judge_for_each():
    """Judge remembers fare lookups by version and UTC hour: across a table change, the grace
    after it and the hours around midnight, every answer is judge's own (which works each out)."""
    schedule = week_of_two_tables()
    grace = timedelta(seconds=600)
    now = CHANGE + timedelta(hours=30)
    many = Judge(now, KNOWN, schedule, changeover_grace=grace)
    checked = 0
    for minutes in range(-24 * 60, 24 * 60, 7):
        at = CHANGE + timedelta(minutes=minutes, microseconds=minutes % 3)
        for version, gross in (("sample-1", 200), ("sample-2", 250), ("made-up", 200)):
            for place in ("", "route-9"):
                t = trip(
                    occurred_at=at,
                    fare_version=version,
                    gross_fare_fen=gross,
                    charged_fen=gross,
                    concession_fen=0,
                    applied_entitlement=None,
                    place_id=place,
                )
                expected = judge(t, now, KNOWN, schedule, changeover_grace=grace)
                assert many(t) == expected, (at, version)
                checked += 1
    assert checked > 2000
    edge = CHANGE - grace  # the grace's own edges, to the microsecond
    for at in (edge - timedelta(microseconds=1), edge, CHANGE + grace, CHANGE + grace * 2):
        t = trip(occurred_at=at, gross_fare_fen=200, charged_fen=200, concession_fen=0)
        t = replace(t, applied_entitlement=None)
        assert many(t) == judge(t, now, KNOWN, schedule, changeover_grace=grace)


def test_a_decision_source_counts_in_both_digests_only_when_there_is_one():
    """Trips stored without one (the previous release) keep their digests; the source is
    part of the trip (a conflict, and not a correction a representment may make)."""
    t = trip(gate_id="g-1")
    marked = replace(t, decision_source=DecisionSource.STALE)
    assert marked.digest() != t.digest()
    assert marked.presentment_digest() != t.presentment_digest()
    assert len({replace(t, decision_source=s).digest() for s in DecisionSource}) == 5
    # A source cannot pass for a gate id, nor a gate id for a source.
    assert (
        replace(t, gate_id="", decision_source=DecisionSource.CACHE).digest()
        != replace(t, gate_id="\x012").digest()
    )
    before = hashlib.sha256(
        "\x00".join(
            (t.operator_id, t.trip_id, "512021", t.card.card_number, "1", t.place_id,
             t.occurred_at.astimezone(UTC).isoformat(), "g-1")
        ).encode()
    ).hexdigest()  # fmt: skip
    assert t.presentment_digest() == before
