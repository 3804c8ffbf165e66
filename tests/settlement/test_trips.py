"""Trips: each judged on its own; the first problem found is the reason.

Storing judged trips is tested beside the ledger (tests/settlement/ledger/).
"""

from __future__ import annotations

import tomllib
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from broker.cards.model import CardRef, Entitlement, Scene
from broker.fares.rules import parse_fares
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
