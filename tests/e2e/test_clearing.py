"""A day across three districts: close, exchange, reconcile — on SQLite and on PostgreSQL.

Every figure is compared with one recomputed from the raw trips by
tests/clearing_day.py, not by the broker's own functions.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from click.testing import CliRunner

from broker._proto.yikatong.v1 import settlement_pb2
from broker.cards.model import shanghai_day
from broker.cli.main import main
from tests.clearing_day import (
    after_day,
    after_window,
    assert_positions_match,
    cli,
    district_positions,
    expected_positions,
    operator_stub,
    record_for,
    simulate_day,
)
from tests.conftest import ANYUE, DAZU, THREE, Cluster


async def close_all(cluster: Cluster, period: str, expect: str = "close #1") -> None:
    for code in THREE:
        out = await cli(
            "settle",
            "close",
            "--config",
            str(cluster.setups[code].config_path),
            "--period",
            period,
            clock=cluster.clock,
        )
        assert expect in out


async def test_a_day_closes_exchanges_and_reconciles(day_cluster: Cluster, now: datetime):
    cluster = day_cluster
    trips = await simulate_day(cluster, now)
    days = {
        shanghai_day(t.record.occurred_at.ToDatetime().replace(tzinfo=now.tzinfo)) for t in trips
    }
    assert len(days) == 1, "the simulated trips straddle midnight; rerun"
    period = days.pop().isoformat()
    cluster.clock.reach(after_day(period))  # the nodes and the commands: the next morning
    await close_all(cluster, period)

    views = await assert_positions_match(cluster.setups, trips, period)
    for got in views.values():  # one line a pair was of a lost or expired card: in dispute
        assert {p["open_disputes"] for p in got.values()} == {1}
    expected = expected_positions(trips)

    # The operator's statement over gRPC: claimed per home district, and accepted.
    s = cluster.setups[DAZU]
    ch, stub = operator_stub(s, cluster.nodes[DAZU].address)
    try:
        st = await stub.GetStatement(
            settlement_pb2.GetStatementRequest(operator_id=s.operator_id, period=period),
            timeout=10,
        )
    finally:
        await ch.close()  # type: ignore[attr-defined]
    by_home = {line.home_district: line for line in st.lines}
    for home in (h for h in THREE if h != DAZU):
        mine = [t for t in trips if t.serving == DAZU and t.home == home]
        assert by_home[home].trips == len(mine)
        assert by_home[home].gross_fen == sum(t.record.gross_fare_fen for t in mine)
        assert by_home[home].accepted_fen == expected[(DAZU, home)]
        assert by_home[home].rejected_trips == 1

    # Rejected lines are disputes; resolve them by hand, then confirm: SETTLED both ways.
    disputes = await cli("settle", "disputes", "--config", str(s.config_path), "--format", "json")
    assert '"CARD_NOT_ACTIVE"' in disputes
    for code in THREE:
        cfg = str(cluster.setups[code].config_path)
        for t in trips:
            if t.serving == code and not t.active:
                await cli(
                    "settle",
                    "resolve",
                    "--config",
                    cfg,
                    "--district",
                    t.home,
                    "--operator",
                    t.record.operator_id,
                    "--trip",
                    t.record.trip_id,
                    "--note",
                    "card reported lost before travel; operator bears it",
                )
    # Before the late window has closed, the day is provisional and confirm refuses it.
    refused = await asyncio.to_thread(
        CliRunner().invoke,
        main,
        ["settle", "confirm", "--config", str(s.config_path), "--period", period],
        obj={"clock": cluster.clock},
    )
    assert refused.exit_code == 1 and "provisional until" in " ".join(refused.output.split())
    cluster.clock.reach(after_window(period))
    await close_all(cluster, period, expect="nothing new to send")  # seals the day everywhere
    for code in THREE:
        await cli(
            "settle",
            "confirm",
            "--config",
            str(cluster.setups[code].config_path),
            "--period",
            period,
            clock=cluster.clock,
        )
    for code in THREE:
        view = await district_positions(cluster.setups[code], period)
        assert {p["state"] for p in view["positions"]} == {"settled"}
    for code in THREE:  # no accepted trip lost or counted twice, both sides' figures agree
        checked = await cli(
            "settle",
            "check",
            "--config",
            str(cluster.setups[code].config_path),
            "--period",
            period,
        )
        assert "PROBLEM" not in checked and "0 not closed yet" in checked, checked


async def test_a_trip_after_close_goes_in_a_supplementary_batch(day_cluster: Cluster, now):
    cluster = day_cluster
    trips = await simulate_day(cluster, now, per_pair=3)
    period = shanghai_day(now - timedelta(minutes=10)).isoformat()
    dazu = cluster.setups[DAZU]
    cluster.clock.reach(after_day(period))
    close = ("settle", "close", "--config", str(dazu.config_path), "--period", period)
    await cli(*close, clock=cluster.clock)
    before = await district_positions(dazu, period)

    late_card = next(c for c in cluster.setups[ANYUE].cards if c.status == "active")
    from broker.cards.model import Scene

    decision = await cluster.gate(DAZU).check(late_card.ref, Scene.BUS)
    late = record_for(dazu, "late-1", late_card, Scene.BUS, now - timedelta(minutes=9), decision)
    ch, stub = operator_stub(dazu, cluster.nodes[DAZU].address)
    try:
        reply = await stub.SubmitTrips(settlement_pb2.SubmitTripsRequest(trips=[late]), timeout=10)
        assert reply.results[0].reason == "ok"
    finally:
        await ch.close()  # type: ignore[attr-defined]
    out = await cli(*close, clock=cluster.clock)
    assert "close #2" in out
    after = await district_positions(dazu, period)
    anyue_before = next(p for p in before["positions"] if p["counterparty"] == ANYUE)
    anyue_after = next(p for p in after["positions"] if p["counterparty"] == ANYUE)
    from tests.clearing_day import SentTrip, expected_claim

    assert anyue_after["receivable_fen"] - anyue_before["receivable_fen"] == expected_claim(
        SentTrip(DAZU, late, True)
    )
    # Nothing new: a third close sends nothing.
    assert "nothing new" in await cli(*close, clock=cluster.clock)
    assert len(trips) > 0
