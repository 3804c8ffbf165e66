"""broker/testbed/demo_day.py: the demo's settlement day over three running nodes.

run_day prices trips at the gates, submits them (some twice), closes the day, adds
late trips in a supplementary batch and reports every district's positions. These
check the report's invariants on a small day (a few trips per pair); the demo's own
run (tests/testbed/test_demo.py, tests/cli/test_main.py) calls it with its defaults.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import grpc
import pytest

from broker.cards.model import shanghai_day
from broker.settlement.ledger import open_ledger
from broker.testbed.demo_day import run_day
from broker.testbed.operator_client import GateClient, open_channel
from broker.trust.config import node_server_name
from tests.conftest import THREE, Cluster

PER_HOME = 4


@pytest.fixture
async def day(cluster: Cluster, now: datetime) -> AsyncIterator[dict[str, Any]]:
    """The report of one small day over the cluster, with the demo's kind of channels."""
    channels: dict[str, grpc.aio.Channel] = {}
    gates: dict[str, GateClient] = {}
    for code, s in cluster.setups.items():
        channels[code] = open_channel(
            cluster.nodes[code].address,
            node_server_name(code),
            s.paths.ca_cert,
            s.operator_cert,
            s.operator_key,
        )
        gates[code] = GateClient(channels[code], s.operator_id)
    try:
        yield await run_day(
            cluster.setups, channels, gates, cluster.clock, seed=5, per_home=PER_HOME
        )
    finally:
        for ch in channels.values():
            await ch.close()


async def test_the_days_positions_agree_pairwise_and_net_to_zero(
    day: dict[str, Any], now: datetime
):
    """What A may claim from B is what B owes A; every district's net adds up; nets sum to 0."""
    assert day["period"] == shanghai_day(now - timedelta(minutes=30)).isoformat()
    view = {(code, r["counterparty"]): r for code, rows in day["positions"].items() for r in rows}
    assert set(view) == {(a, b) for a in THREE for b in THREE if a != b}
    for (a, b), mine in view.items():
        theirs = view[(b, a)]
        assert mine["receivable_fen"] == theirs["payable_fen"]
        assert mine["net_fen"] == -theirs["net_fen"]
        assert mine["open_disputes"] == 0  # every line was priced by the gate itself
    assert {r["state"] for rows in day["positions"].values() for r in rows} == {"settled"}
    nets = day["multilateral_net_fen"]
    assert set(nets) == set(THREE)
    for code, rows in day["positions"].items():
        assert nets[code] == sum(r["net_fen"] for r in rows)
    assert day["nets_sum_fen"] == sum(nets.values()) == 0
    assert any(n != 0 for n in nets.values())  # the premise: money did move


async def test_resubmitted_trips_are_stored_once_and_late_ones_go_in_a_second_batch(
    day: dict[str, Any], cluster: Cluster
):
    n_pairs = len(THREE) * (len(THREE) - 1)
    assert 0 < day["trips"] <= PER_HOME * n_pairs  # refused checks are not trips
    assert 0 < day["duplicates_resubmitted"] <= 5 * len(THREE)
    assert 0 <= day["late_trips"] <= 2 * len(THREE)
    stored = 0
    for s in cluster.setups.values():
        ledger = open_ledger(s.config.ledger.path, s.config.ledger.url, s.config.ledger.schema)
        try:
            stored += ledger.count()
        finally:
            ledger.close()
    assert stored == day["trips"] + day["late_trips"]
    batches = [r["batches"] for rows in day["positions"].values() for r in rows]
    assert all(n in (1, 2) for n in batches)
    assert (day["late_trips"] > 0) == (2 in batches)
