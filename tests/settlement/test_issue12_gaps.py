"""Issue 12 done-when lines whose tests ran on SQLite only, here on PostgreSQL as well.

- Item 2 at the home district: a line priced by a fare table that was no longer in
  force when the trip occurred is refused ``UNPUBLISHED_FARES`` by the home's real
  Receiver, whose published tables live in its clearing store (SQLite or PostgreSQL);
  a line inside the changeover grace, and one by the table in force, are accepted.
  (tests/settlement/clearing/test_verify.py checks the rule on a SQLite-only home.)
- Item 3: ``broker settle check`` names each accident on both databases
  (tests/settlement/clearing/test_check.py runs on SQLite only).
- Item 7: ``broker settle confirm`` of a day that has not ended, before any close of it
  (so no position to refuse one by one), is refused saying when the day ends (it printed
  an empty table and exited 0 until the command checked the day itself).

Districts, trips and claims come from tests/settlement/clearing/pair.py; the amounts
here are written out by hand.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from broker.cards.model import shanghai_day
from broker.cli.main import main
from broker.settlement.clearing.check import check_day
from broker.settlement.clearing.positions import position
from broker.settlement.ledger.store import seal_day
from broker.testbed.build import SAMPLE_FARES, build
from tests.settlement.clearing.pair import (
    AT,
    DAY,
    HOME,
    OPERATOR,
    SERVING,
    SETTLE_AT,
    World,
    backend_url,
    card,
    sample_fares,
    trip,
)

NEW_BUS_FEN = 300  # "sample-2"'s bus fare; "sample-1"'s is 200
DAY_STARTS = datetime(2026, 3, 9, 16, 0, tzinfo=UTC)  # DAY's midnight in Asia/Shanghai


def with_second_version() -> str:
    """The sample rules, then "sample-2" (a dearer bus) in force from DAY."""
    second = SAMPLE_FARES
    for old, new in (
        ('version = "sample-1"', 'version = "sample-2"'),
        ('effective_from = "2020-01-01"', f'effective_from = "{DAY.isoformat()}"'),
        ("gross_fare_fen = 200", f"gross_fare_fen = {NEW_BUS_FEN}"),
    ):
        assert second.count(old) == 1, f"SAMPLE_FARES changed: {old!r}"
        second = second.replace(old, new)
    return SAMPLE_FARES + second


@pytest.fixture(params=["sqlite", "postgres"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path, ledger_url=backend_url(request))
    yield w
    w.close()


# ---------------------------------------------------------------- item 2, at the home


async def test_the_home_refuses_a_line_priced_by_a_table_no_longer_in_force(world: World) -> None:
    world[SERVING].fares = sample_fares(SERVING, with_second_version())
    plain = card(HOME, "plain")
    old_table = trip(plain, "old-table")  # sample-1 at 10:00 on DAY: ten hours after the change
    in_grace = trip(plain, "in-grace", at=DAY_STARTS + timedelta(seconds=599))
    by_new = replace(
        trip(plain, "by-new"),
        fare_version="sample-2",
        gross_fare_fen=NEW_BUS_FEN,
        charged_fen=NEW_BUS_FEN,
    )
    past_grace = trip(plain, "past-grace", at=DAY_STARTS + timedelta(seconds=601))
    world[SERVING].record(old_table, in_grace, by_new, past_grace)
    sender = world.sender(SERVING)
    report = await sender.close(DAY)
    assert report.failures == []
    assert [(b.counterparty, b.lines) for b in report.batches] == [(HOME, 4)]
    disputes = {d["trip_id"]: (d["code"], d["state"]) for d in world[SERVING].store.disputes(DAY)}
    assert disputes == {
        "old-table": ("UNPUBLISHED_FARES", "open"),
        "past-grace": ("UNPUBLISHED_FARES", "open"),
    }
    judged = dict(
        world[HOME].home_store.db.all(
            "SELECT trip_id, code FROM in_lines WHERE period = ?", (DAY.isoformat(),)
        )
    )
    assert judged == {
        "old-table": "UNPUBLISHED_FARES",
        "in-grace": "ACCEPTED",
        "by-new": "ACCEPTED",
        "past-grace": "UNPUBLISHED_FARES",
    }
    # What the home owes: the grace line (200) and the line by the table in force (300).
    mine = position(world[SERVING].store, HOME, DAY)
    theirs = position(world[HOME].home_store, SERVING, DAY)
    assert (mine.receivable_fen, theirs.payable_fen) == (200 + NEW_BUS_FEN, 200 + NEW_BUS_FEN)


# ---------------------------------------------------------------- item 3, settle check


async def closed_day(world: World) -> None:
    world[SERVING].record(trip(card(HOME, "plain"), "p-1"), trip(card(HOME, "plain"), "p-2"))
    report = await world.sender(SERVING).close(DAY)
    assert report.failures == [] and len(report.batches) == 1


async def test_check_proves_a_closed_day_and_names_a_trip_left_out_of_a_sealed_one(
    world: World,
) -> None:
    await closed_day(world)
    found = check_day(world[SERVING].store, SERVING, DAY)
    assert found.clean, found.problems
    assert (found.accepted, found.in_batches, found.not_closed) == (2, 2, 0)
    assert (found.batches, found.acknowledged) == (1, 1)
    world[SERVING].record(trip(card(HOME, "plain"), "late-1"))
    assert check_day(world[SERVING].store, SERVING, DAY).not_closed == 1  # not a fault yet
    with world[SERVING].store.trips.write():  # sealed without a close planning late-1
        seal_day(world[SERVING].store.trips, DAY, SETTLE_AT)
    assert check_day(world[SERVING].store, SERVING, DAY).problems == [
        f"trip {OPERATOR}/late-1 (to {HOME}) is in no batch, and the day is sealed: "
        "run `broker settle close` for it"
    ]
    world.now = SETTLE_AT
    await world.sender(SERVING).close(DAY)
    assert check_day(world[SERVING].store, SERVING, DAY).clean


@pytest.mark.parametrize(
    ("accident", "named"),
    [
        ("DELETE FROM out_batches", "is in no batch"),
        (
            "INSERT INTO out_batches (counterparty, period, seq, kind, lo, hi, state, created_at) "
            "SELECT counterparty, period, seq + 1, kind, lo, hi, 'built', created_at "
            "FROM out_batches",
            "is in 2 batches",
        ),
        ("UPDATE out_batches SET claimed_fen = claimed_fen + 1", "the home acknowledged 2 lines"),
    ],
    ids=["batch-lost", "counted-twice", "figures-differ"],
)
async def test_check_names_each_accident(world: World, accident: str, named: str) -> None:
    await closed_day(world)
    db = world[SERVING].store.db
    with db.write():
        db.execute(accident)
    found = check_day(world[SERVING].store, SERVING, DAY)
    assert not found.clean
    assert any(named in p for p in found.problems), found.problems


# ---------------------------------------------------------------- item 7, confirm


def test_confirm_of_today_before_any_close_is_refused_saying_when_it_ends(
    tmp_path: Path, now: datetime
) -> None:
    district = build(tmp_path, (SERVING,), now, cards_per_district=1)[SERVING]
    today = shanghai_day(now)
    result = CliRunner().invoke(
        main,
        ["settle", "confirm", "--config", str(district.config_path), "--period", str(today)],
    )
    ends = f"{(today + timedelta(days=1)).isoformat()}T00:00+08:00"
    assert result.exit_code == 1, result.output
    assert f"the day has not ended; it ends at {ends}" in " ".join(result.output.split())


def test_the_grace_edges_are_where_the_test_puts_them() -> None:
    """The instants above, by hand: DAY starts at 16:00 UTC the day before; AT is 10:00."""
    assert DAY_STARTS + timedelta(hours=10) == AT
