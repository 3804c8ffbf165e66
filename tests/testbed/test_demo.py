"""broker/testbed/demo.py: the demo's expected answers, its plan of checks, its report.

The pure parts are tested directly; one small run_demo (three real nodes, a few
checks) checks the report's invariants. tests/cli/test_main.py runs the full
``broker demo --json`` with 400 checks and checks the decision sources per pair.
"""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from broker.cards.model import CardRef
from broker.testbed.build import SyntheticCard
from broker.testbed.demo import (
    DISTRICTS,
    HOT_CARDS,
    SCENES,
    UNCONFIGURED,
    DemoReport,
    PairStats,
    expected_allow,
    plan_checks,
    run_demo,
)

# 16:30 UTC on 5 January is 00:30 on 6 January in Shanghai.
LATE_EVENING_UTC = datetime(2026, 1, 5, 16, 30, tzinfo=UTC)


def card(
    district: str = "500111", status: str = "active", valid_until: date = date(2030, 1, 1), n=1
) -> SyntheticCard:
    return SyntheticCard(
        CardRef(district, f"C{district}{n:07d}"),
        status,
        valid_until,
        disabled=False,
        student=False,
        birth_date=date(1950, 1, 1),
    )


def test_expected_allow_admits_an_active_card_within_its_validity():
    assert expected_allow(card(), LATE_EVENING_UTC)


def test_expected_allow_refuses_unknown_lost_suspended_and_unconfigured_cards():
    assert not expected_allow(None, LATE_EVENING_UTC)
    assert not expected_allow(card(status="lost"), LATE_EVENING_UTC)
    assert not expected_allow(card(status="suspended"), LATE_EVENING_UTC)
    assert not expected_allow(card(district=UNCONFIGURED), LATE_EVENING_UTC)


def test_expected_allow_counts_validity_in_shanghai_days():
    """Valid until 5 January: still valid at 23:59 Shanghai, expired half an hour later."""
    valid_5th = card(valid_until=date(2026, 1, 5))
    assert expected_allow(valid_5th, LATE_EVENING_UTC - timedelta(minutes=31))  # 23:59
    assert not expected_allow(valid_5th, LATE_EVENING_UTC)  # 00:30 on the 6th
    assert expected_allow(card(valid_until=date(2026, 1, 6)), LATE_EVENING_UTC)


def pools(per_district: int = 100) -> dict[str, list[SyntheticCard]]:
    return {d: [card(d, n=i) for i in range(per_district)] for d in DISTRICTS}


def test_plan_checks_is_reproducible_and_has_the_asked_length():
    a = plan_checks(pools(), 300, random.Random(9))
    assert len(a) == 300
    assert a == plan_checks(pools(), 300, random.Random(9))
    assert a != plan_checks(pools(), 300, random.Random(10))
    assert plan_checks(pools(), 0, random.Random(9)) == []


def test_plan_checks_mixes_registered_unknown_and_unconfigured_cards():
    cards = pools()
    known = {c.ref: c for pool in cards.values() for c in pool}
    plan = plan_checks(cards, 2000, random.Random(1))
    kinds: Counter[str] = Counter()
    for gate, ref, expected_card, scene in plan:
        assert gate in DISTRICTS and scene in SCENES
        if expected_card is not None:
            assert known[ref] is expected_card  # the card it will be judged against
            kinds["registered"] += 1
        elif ref.issuer_region == UNCONFIGURED:
            kinds["unconfigured"] += 1
        else:
            assert ref.issuer_region in DISTRICTS and ref not in known
            kinds["unknown"] += 1
    # About 90 %, 6 % and 4 % of 2000.
    assert kinds["registered"] > 1600 and kinds["unknown"] > 60 and kinds["unconfigured"] > 40
    assert {gate for gate, *_ in plan} == set(DISTRICTS)
    assert {scene for *_, scene in plan} == set(SCENES)


def test_plan_checks_draws_most_taps_from_the_hot_cards():
    cards = pools(per_district=1000)
    hot = {c.ref for pool in cards.values() for c in pool[:HOT_CARDS]}
    registered = [ref for _, ref, c, _ in plan_checks(cards, 2000, random.Random(4)) if c]
    assert sum(ref in hot for ref in registered) / len(registered) > 0.7


def test_pair_stats_as_dict_reports_percentiles_and_sorted_sources():
    stats = PairStats(checks=4, allowed=3, denied=1, charged_fen=300, concession_fen=100)
    stats.sources.update({"PEER": 1, "CACHE": 2, "HOME": 1})
    stats.latencies_ms.extend([4.0, 1.0, 3.0, 2.0])
    d = stats.as_dict()
    assert list(d["sources"]) == ["CACHE", "HOME", "PEER"]  # type: ignore[call-overload]
    assert d["p50_ms"] == 2.0 and d["p99_ms"] == 4.0
    assert (d["checks"], d["allowed"], d["denied"]) == (4, 3, 1)


def test_pair_stats_as_dict_of_no_latencies_is_zero():
    d = PairStats().as_dict()
    assert d["p50_ms"] == d["p99_ms"] == 0.0 and d["sources"] == {}


def test_demo_report_sums_pairs_and_names_known_districts():
    a, b = PairStats(checks=2, mismatches=1), PairStats(checks=3)
    report = DemoReport({("512021", "799999"): b, ("500111", "500111"): a}, seconds=1.23456)
    d = report.as_dict()
    assert d["checks"] == 5 and d["mismatches"] == 1 and d["seconds"] == 1.235
    pairs = d["pairs"]
    assert isinstance(pairs, list)
    assert [(p["gate_district"], p["home_district"]) for p in pairs] == [
        ("500111", "500111"),
        ("512021", "799999"),
    ]
    assert pairs[0]["gate_name"] == pairs[0]["home_name"] == "Dazu District"
    assert pairs[1]["gate_name"] == "Anyue County"
    assert pairs[1]["home_name"] == "799999"  # a code not in the list stands for itself
    assert d["settlement"] == {}


async def test_a_small_run_has_no_mismatches_and_its_day_nets_to_zero(tmp_path: Path):
    progressed: list[int] = []
    report = await run_demo(
        tmp_path, checks=40, concurrency=4, cards_per_district=60, on_progress=progressed.append
    )
    d = report.as_dict()
    assert d["checks"] == 40 and sum(progressed) == 40
    assert d["mismatches"] == 0
    pairs = d["pairs"]
    assert isinstance(pairs, list)
    for p in pairs:
        assert p["allowed"] + p["denied"] == p["checks"] == sum(p["sources"].values())
        assert p["charged_fen"] >= 0 and p["concession_fen"] >= 0
    day = d["settlement"]
    assert isinstance(day, dict)
    assert day["nets_sum_fen"] == 0
    assert sum(day["multilateral_net_fen"].values()) == 0
    assert set(day["positions"]) == set(DISTRICTS)
    assert day["trips"] > 0
