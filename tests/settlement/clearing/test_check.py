"""``broker settle check`` (broker/settlement/clearing/check.py): a day proved, or its faults named.

Driven on the two-district world of tests/settlement/clearing/pair.py (real stores, real
signed acknowledgements); each accident is made by hand in the stores and must be found.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from broker.node.config import render_config
from broker.settlement.clearing.check import DayCheck, check_day
from broker.settlement.clearing.sender import Sender
from broker.settlement.ledger.store import seal_day
from tests.helpers import run_cli
from tests.settlement.clearing.pair import (
    DAY,
    HOME,
    OPERATOR,
    SERVING,
    SETTLE_AT,
    THIRD,
    World,
    card,
    trip,
)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.close()


@pytest.fixture
def sender(world: World) -> Sender:
    return world.sender(SERVING)


def check(world: World) -> DayCheck:
    return check_day(world[SERVING].store, SERVING, DAY)


async def closed_day(world: World, sender: Sender) -> None:
    world[SERVING].record(trip(card(HOME, "plain"), "p-1"), trip(card(HOME, "plain"), "p-2"))
    report = await sender.close(DAY)
    assert report.failures == [] and len(report.batches) == 1


async def test_a_closed_and_acknowledged_day_is_clean(world: World, sender: Sender) -> None:
    await closed_day(world, sender)
    found = check(world)
    assert found.clean, found.problems
    assert (found.accepted, found.in_batches, found.not_closed) == (2, 2, 0)
    assert (found.batches, found.acknowledged) == (1, 1)


async def test_a_trip_after_the_last_close_is_not_closed_yet_not_a_fault(
    world: World, sender: Sender
) -> None:
    await closed_day(world, sender)
    world[SERVING].record(trip(card(HOME, "plain"), "late-1"))
    found = check(world)
    assert found.clean and found.not_closed == 1


async def test_once_the_day_is_sealed_a_trip_after_the_last_close_is_a_fault(
    world: World, sender: Sender
) -> None:
    """Sealed, nothing can follow it: a trip in no batch would never be cleared."""
    await closed_day(world, sender)
    world[SERVING].record(trip(card(HOME, "plain"), "late-1"))
    with world[SERVING].store.trips.write():  # sealed without a close planning late-1
        seal_day(world[SERVING].store.trips, DAY, SETTLE_AT)
    found = check(world)
    assert found.not_closed == 0
    assert found.problems == [
        f"trip {OPERATOR}/late-1 (to {HOME}) is in no batch, and the day is sealed: "
        "run `broker settle close` for it"
    ]
    world.now = SETTLE_AT
    await sender.close(DAY)  # the close puts it in a batch
    assert check(world).clean


async def test_a_batch_row_lost_leaves_its_trips_in_no_batch(world: World, sender: Sender) -> None:
    await closed_day(world, sender)
    world[SERVING].store.db.execute("DELETE FROM out_batches")
    found = check(world)
    assert sorted(found.problems) == [
        f"trip {OPERATOR}/p-1 (to {HOME}) is in no batch",
        f"trip {OPERATOR}/p-2 (to {HOME}) is in no batch",
    ]


async def test_two_batches_over_one_range_count_a_trip_twice(world: World, sender: Sender) -> None:
    await closed_day(world, sender)
    db = world[SERVING].store.db
    db.execute(
        "INSERT INTO out_batches (counterparty, period, seq, kind, lo, hi, state, created_at) "
        "SELECT counterparty, period, seq + 1, kind, lo, hi, 'built', created_at FROM out_batches"
    )
    found = check(world)
    assert any("is in 2 batches" in p for p in found.problems)


async def test_figures_that_disagree_with_the_signed_acknowledgement_are_named(
    world: World, sender: Sender
) -> None:
    await closed_day(world, sender)
    world[SERVING].store.db.execute("UPDATE out_batches SET claimed_fen = claimed_fen + 1")
    found = check(world)
    assert any("the home acknowledged 2 lines" in p for p in found.problems), found.problems


async def test_a_home_not_yet_a_peer_keeps_its_trips_in_a_waiting_batch(
    world: World, sender: Sender
) -> None:
    world[SERVING].record(trip(card(THIRD, "plain"), "t-1"), trip(card(HOME, "plain"), "p-1"))
    await sender.close(DAY)
    found = check(world)
    assert found.clean and (found.in_batches, found.acknowledged) == (2, 1)


async def test_the_command_prints_the_day_and_fails_on_a_problem(
    world: World, sender: Sender, tmp_path: Path
) -> None:
    await closed_day(world, sender)
    cfg = world[SERVING].cfg
    peers = tuple(replace(p, bundle_file=tmp_path / f"{p.district}.json") for p in cfg.peers)
    config = tmp_path / "node.toml"
    config.write_text(render_config(replace(cfg, peers=peers)))
    out = run_cli("settle", "check", "--config", str(config), "--period", DAY.isoformat())
    assert "2 accepted trip(s)" in out and "2 in batches" in out and "PROBLEM" not in out
    world[SERVING].store.db.execute("DELETE FROM out_batches")
    with pytest.raises(RuntimeError):
        run_cli("settle", "check", "--config", str(config), "--period", DAY.isoformat())
