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
import sys
from datetime import datetime

import pytest

from broker.cards import shanghai_day
from tests.clearing_day import assert_positions_match, district_positions, simulate_day
from tests.conftest import DAZU, THREE, Cluster


async def broker(*args: str, crash_at: str | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "YIKATONG_CRASH_AT"}
    if crash_at:
        env["YIKATONG_CRASH_AT"] = crash_at
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        "--log-level",
        "warning",
        *args,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(err.decode())
    return proc.returncode or 0


@pytest.mark.parametrize(
    "point", ["fares_published", "close_planned", "batch_sent", "ack_stored", "position_agreed"]
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
    assert await broker(
        "settle", "close", "--config", cfg[DAZU], "--period", day, crash_at=crash
    ) == (-signal.SIGKILL if crash else 0)
    for code in THREE:  # the restart (for Dazu) and the other districts' closes
        assert await broker("settle", "close", "--config", cfg[code], "--period", day) == 0

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
        assert (
            await broker(
                "settle", "confirm", "--config", cfg[DAZU], "--period", day, crash_at=point
            )
            == -signal.SIGKILL
        )
        assert await broker("settle", "confirm", "--config", cfg[DAZU], "--period", day) == 0
        view = await district_positions(cluster.setups[DAZU], day)
        assert {p["state"] for p in view["positions"]} == {"settled"}
