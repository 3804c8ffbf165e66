"""kill -9 of the closing process at each state change, then a restart: nothing lost or doubled.

The close runs as its own process (``python -m broker settle close``), as
operations staff run it; ``YIKATONG_CRASH_AT`` makes it SIGKILL itself right
after the named state change. A second run must finish the day, and every
figure must equal the one recomputed from the raw trips — which is what a
run without crashes gives (tests/test_clearing_e2e.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from collections.abc import Callable
from datetime import datetime, timedelta

import pytest

from broker._proto.yikatong.v1 import settlement_pb2
from broker.cards.model import Scene, shanghai_day
from broker.node.server import Node
from broker.settlement.clearing.store import clearing_path
from broker.testbed.build import DistrictSetup
from tests.clearing_day import (
    SentTrip,
    after_day,
    after_window,
    assert_positions_match,
    district_positions,
    expected_claim,
    operator_stub,
    record_for,
    simulate_day,
)
from tests.conftest import ANYUE, DAZU, THREE, Cluster
from tests.helpers import wait_healthy


async def broker(
    *args: str,
    crash_at: str | None = None,
    may_fail: bool = False,
    clock: Callable[[], datetime] | None = None,
) -> int:
    """``python -m broker ARGS`` in a process of its own (on ``clock``'s time, if given)."""
    env = {k: v for k, v in os.environ.items() if k != "YIKATONG_CRASH_AT"}
    if crash_at:
        env["YIKATONG_CRASH_AT"] = crash_at
    entry = ["tests.cli_at", clock().isoformat()] if clock else ["broker"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        *entry,
        "--log-level",
        "warning",
        *args,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode not in (0, -signal.SIGKILL) and not may_fail:
        raise AssertionError(err.decode())
    return proc.returncode or 0


@pytest.mark.parametrize(
    "point", ["close_planned", "fares_published", "batch_sent", "ack_stored", "position_agreed"]
)
async def test_the_closing_process_killed_at_each_state_change_resumes(
    day_cluster: Cluster, now: datetime, point: str
):
    cluster = day_cluster
    trips = await simulate_day(cluster, now, per_pair=4)
    period = shanghai_day(trips[0].record.occurred_at.ToDatetime().replace(tzinfo=now.tzinfo))
    day = period.isoformat()
    cfg = {code: str(cluster.setups[code].config_path) for code in THREE}
    crash = point if point != "position_agreed" else None
    clock = cluster.clock
    clock.reach(after_day(day))
    assert await broker(
        "settle", "close", "--config", cfg[DAZU], "--period", day, crash_at=crash, clock=clock
    ) == (-signal.SIGKILL if crash else 0)
    for code in THREE:  # the restart (for Dazu) and the other districts' closes
        assert (
            await broker("settle", "close", "--config", cfg[code], "--period", day, clock=clock)
            == 0
        )
    for code in THREE:  # after the crash: every accepted trip in exactly one batch, figures agree
        assert await broker("settle", "check", "--config", cfg[code], "--period", day) == 0

    await assert_positions_match(cluster.setups, trips, day)

    if point == "position_agreed":
        for t in trips:  # settle by hand the lines of lost or expired cards
            if not t.active:
                assert (
                    await broker(
                        "settle",
                        "resolve",
                        "--config",
                        cfg[t.serving],
                        "--district",
                        t.home,
                        "--operator",
                        t.record.operator_id,
                        "--trip",
                        t.record.trip_id,
                        "--note",
                        "written off",
                    )
                    == 0
                )
        clock.reach(after_window(day))
        for code in THREE:  # the closes after the late window seal the day everywhere
            assert (
                await broker("settle", "close", "--config", cfg[code], "--period", day, clock=clock)
                == 0
            )
        assert (
            await broker(
                "settle",
                "confirm",
                "--config",
                cfg[DAZU],
                "--period",
                day,
                crash_at=point,
                clock=clock,
            )
            == -signal.SIGKILL
        )
        confirm = ("settle", "confirm", "--config", cfg[DAZU], "--period", day)
        assert await broker(*confirm, clock=clock) == 0
        view = await district_positions(cluster.setups[DAZU], day)
        assert {p["state"] for p in view["positions"]} == {"settled"}
        for code in THREE:  # settled: still every trip in one batch, both sides agreeing
            assert await broker("settle", "check", "--config", cfg[code], "--period", day) == 0


async def serve(config: str, crash_at: str | None) -> asyncio.subprocess.Process:
    """``python -m broker serve`` as its own process, returned once it answers health checks."""
    env = {k: v for k, v in os.environ.items() if k != "YIKATONG_CRASH_AT"}
    if crash_at:
        env["YIKATONG_CRASH_AT"] = crash_at
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        "--log-level",
        "warning",
        "serve",
        "--config",
        config,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return proc


async def healthy(cluster_setups: dict[str, DistrictSetup], code: str, me: str) -> None:
    s = cluster_setups[code]
    await wait_healthy(s.config.listen, s, cluster_setups[me])


async def test_the_home_node_killed_before_it_commits_an_ack_gets_the_batch_again(
    districts: dict[str, DistrictSetup], now: datetime
):
    """Anyue's verifier process dies (kill -9) verifying Dazu's batch, before its commit:
    the node answers the exchange UNAVAILABLE and goes on serving; nothing of the batch is
    kept; restarted without the crash point, Anyue verifies the resent batch once, and the
    figures are the recomputed ones."""
    anyue_cfg = str(districts[ANYUE].config_path)
    anyue = await serve(anyue_cfg, crash_at="home_before_commit")
    await healthy(districts, ANYUE, DAZU)
    dazu = await Node.start(districts[DAZU].config)
    cluster = Cluster({k: districts[k] for k in (DAZU,)}, {DAZU: dazu})
    try:
        setup = districts[DAZU]
        gate = cluster.gate(DAZU)
        when = now - timedelta(minutes=10)
        sent = []
        cards = [c for c in districts[ANYUE].cards if c.status == "active"][:8]
        for i, card in enumerate(cards):
            decision = await gate.check(card.ref, Scene.BUS)
            assert decision.allow
            rec = record_for(setup, f"hc-{i}", card, Scene.BUS, when, decision)
            sent.append(SentTrip(DAZU, rec, True))
        ch, stub = operator_stub(setup, dazu.address)
        try:
            await stub.SubmitTrips(
                settlement_pb2.SubmitTripsRequest(trips=[t.record for t in sent]), timeout=10
            )
        finally:
            await ch.close()  # type: ignore[attr-defined]
        day = shanghai_day(when).isoformat()
        cfg = str(setup.config_path)
        # Today has not ended: --force (the home's verification is what this test is about).
        close = ("settle", "close", "--config", cfg, "--period", day, "--force")
        assert await broker(*close, may_fail=True)  # not acknowledged: the verifier died
        assert anyue.returncode is None  # the node itself serves on
        await healthy(districts, ANYUE, DAZU)
        ledger_path = districts[ANYUE].config.ledger.path
        assert ledger_path is not None
        stored = sqlite3.connect(clearing_path(ledger_path))
        try:
            assert stored.execute("SELECT count(*) FROM in_batches").fetchone() == (0,)
        finally:
            stored.close()
        anyue.terminate()
        assert await anyue.wait() == 0
        anyue = await serve(anyue_cfg, crash_at=None)
        await healthy(districts, ANYUE, DAZU)
        assert await broker(*close) == 0
        for config in (cfg, anyue_cfg):  # both sides: every trip in one batch, figures agree
            assert await broker("settle", "check", "--config", config, "--period", day) == 0
        owed = sum(expected_claim(t) for t in sent)
        mine = await district_positions(setup, day)
        theirs = await district_positions(districts[ANYUE], day)
        assert [(p["counterparty"], p["receivable_fen"]) for p in mine["positions"]] == [
            (ANYUE, owed)
        ]
        assert [(p["counterparty"], p["payable_fen"]) for p in theirs["positions"]] == [
            (DAZU, owed)
        ]
    finally:
        await cluster.close()
        if anyue.returncode is None:
            anyue.terminate()
            await anyue.wait()
