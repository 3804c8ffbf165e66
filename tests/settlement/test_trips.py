"""Trips: judged one by one, stored durably, idempotent on (operator, trip id)."""

from __future__ import annotations

import tomllib
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from broker.cards.model import CardRef, Entitlement, Scene
from broker.fares.rules import parse_fares
from broker.settlement.ledger import SqliteLedger
from broker.settlement.trips import Outcome, Reason, Trip, judge
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


def test_recording_is_idempotent_and_a_changed_resubmission_is_a_conflict(ledger_factory):
    ledger = ledger_factory()
    good, bad = trip(1), trip(2, charged_fen=10)
    judged = [(t, judge(t, NOW, KNOWN, FARES)) for t in (good, bad)]
    first = ledger.record(judged, NOW)
    assert [j.outcome for j in first] == [Outcome.ACCEPTED, Outcome.REJECTED]
    again = ledger.record(judged, NOW + timedelta(seconds=1))
    assert again == first and ledger.count() == 2  # nothing stored twice
    changed = replace(good, place_id="route-9")
    conflict = ledger.record([(changed, judge(changed, NOW, KNOWN, FARES))], NOW)
    assert conflict[0].outcome is Outcome.CONFLICT
    assert ledger.outcome("bus-01", good.trip_id) == first[0]  # the stored trip is untouched
    ledger.close()
    reopened = ledger_factory()  # committed before acknowledged
    assert reopened.count() == 2 and reopened.outcome("bus-01", bad.trip_id) == first[1]
    reopened.close()


def test_a_trip_at_23_59_59_999_and_one_at_midnight_shanghai_land_on_different_days(tmp_path):
    import sqlite3

    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")  # the day column, read back raw
    late = datetime(2026, 11, 27, 15, 59, 59, 999000, tzinfo=UTC)  # 23:59:59.999 in Shanghai
    early = datetime(2026, 11, 27, 16, 0, 0, tzinfo=UTC)  # 00:00:00 on the 28th
    trips = [trip(1, occurred_at=late), trip(2, occurred_at=early)]
    ledger.record([(t, judge(t, NOW, KNOWN, FARES)) for t in trips], NOW)
    ledger.close()
    with sqlite3.connect(tmp_path / "ledger.sqlite3") as db:
        days = [d for (d,) in db.execute("SELECT settlement_day FROM trips ORDER BY trip_id")]
    assert days == ["2026-11-27", "2026-11-28"]


def test_accepted_trips_of_a_day_come_back_whole(ledger_factory):
    from datetime import date

    ledger = ledger_factory()
    late = datetime(2026, 11, 27, 15, 59, 59, 999000, tzinfo=UTC)  # 27th in Shanghai
    trips = [
        trip(1, occurred_at=late),
        trip(2),
        trip(3, operator_id="museum-01"),
        trip(4, charged_fen=10),
    ]  # the last is rejected
    ledger.record([(t, judge(t, NOW, KNOWN, FARES)) for t in trips], NOW)
    day = ledger.accepted_trips(date(2026, 11, 28))
    assert sorted(t.trip_id for t in day) == ["t-000002", "t-000003"]
    assert ledger.accepted_trips(date(2026, 11, 28), "museum-01") == [trips[2]]
    assert ledger.accepted_trips(date(2026, 11, 27)) == [trips[0]]  # every field round-trips
    ledger.close()


def test_a_batch_mixing_new_known_and_conflicting_ids_answers_each(ledger_factory):
    ledger = ledger_factory()
    a, b = trip(1), trip(2)
    ledger.record([(t, judge(t, NOW, KNOWN, FARES)) for t in (a, b)], NOW)
    changed_b, c = replace(b, place_id="route-9"), trip(3, charged_fen=10)
    mixed = [(t, judge(t, NOW, KNOWN, FARES)) for t in (changed_b, c, a)]
    got = ledger.record(mixed, NOW + timedelta(seconds=1))
    assert [j.outcome for j in got] == [Outcome.CONFLICT, Outcome.REJECTED, Outcome.ACCEPTED]
    assert got[1].reason is Reason.BAD_AMOUNTS
    assert ledger.count() == 3  # only the new one was added
    ledger.close()
