"""Net positions (broker.settlement.clearing.positions) read from real clearing stores.

The state comes from real exchanges between districts on disk (tests/settlement/
clearing/pair.py: a Sender's close reaches the home district's Receiver without
a network), and every expected figure is the sum of claims written out by hand.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from broker.cards.model import Entitlement, Scene
from broker.settlement.clearing.positions import Position, position, positions
from tests.settlement.clearing.pair import (
    AT,
    DAY,
    HOME,
    SERVING,
    SETTLE_AT,
    THIRD,
    World,
    backend_url,
    card,
    trip,
)


@pytest.fixture(params=["sqlite", "postgres"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path, ledger_url=backend_url(request))
    yield w
    w.close()


def serve_home_cardholders(world: World) -> None:
    """SERVING's operator carries four of HOME's card-holders; one card was lost."""
    world[SERVING].record(
        trip(card(HOME, "plain"), "p-1"),  # claims 200
        trip(card(HOME, "senior"), "s-1", Entitlement.SENIOR_65),  # claims 200
        trip(card(HOME, "student"), "st-1", Entitlement.STUDENT),  # claims 133
        trip(card(HOME, "lost"), "x-1"),  # claims 200; the home district refuses it
    )


def test_a_fresh_store_has_no_positions(world: World) -> None:
    """No batch either way: no counterparty is listed, and a position asked for is all zero."""
    assert positions(world[SERVING].store, DAY, SERVING) == []
    p = position(world[SERVING].store, HOME, DAY)
    assert (p.receivable_fen, p.payable_fen, p.net_fen) == (0, 0, 0)
    assert (p.open_disputes, p.pending_batches) == (0, 0)


def test_a_planned_close_is_pending_and_provisional_before_the_late_window(world: World) -> None:
    """A built batch counts as pending, with nothing receivable; the day is provisional."""
    serve_home_cardholders(world)
    assert world.sender(SERVING).plan_close(DAY) == 1
    (p,) = positions(world[SERVING].store, DAY, SERVING)
    assert p == Position(HOME, 0, 0, "provisional", open_disputes=0, pending_batches=1)


def test_after_the_window_a_sealing_close_is_open_until_its_batch_is_acknowledged(
    world: World,
) -> None:
    """After the late window, the close seals the day: then its state says what is pending."""
    serve_home_cardholders(world)
    world.now = SETTLE_AT
    assert world.sender(SERVING).plan_close(DAY) == 1
    (p,) = positions(world[SERVING].store, DAY, SERVING)
    assert p == Position(HOME, 0, 0, "open", open_disputes=0, pending_batches=1)


async def test_receivable_is_what_the_home_accepted_and_its_payable_the_mirror(
    world: World,
) -> None:
    """Accepted claims only: the lost card's line is a dispute, not a receivable."""
    serve_home_cardholders(world)
    report = await world.sender(SERVING).close(DAY)
    assert report.failures == []
    mine = position(world[SERVING].store, HOME, DAY)
    theirs = position(world[HOME].store, SERVING, DAY)
    assert (mine.receivable_fen, mine.payable_fen) == (200 + 200 + 133, 0)
    assert (mine.state, mine.open_disputes, mine.pending_batches) == ("provisional", 1, 0)
    assert (theirs.receivable_fen, theirs.payable_fen) == (0, 533)
    assert theirs.open_disputes == 0  # disputes are the serving district's to pursue
    assert mine.net_fen + theirs.net_fen == 0


async def test_both_directions_net_against_each_other(world: World) -> None:
    """Each side's net is receivable − payable; the pair's two nets sum to zero."""
    serve_home_cardholders(world)
    world[HOME].record(
        trip(card(SERVING, "senior"), "a-1", Entitlement.SENIOR_60, scene=Scene.SCENIC_AREA),
    )
    await world.sender(SERVING).close(DAY)
    await world.sender(HOME).close(DAY)
    (mine,) = positions(world[SERVING].store, DAY, SERVING)
    (theirs,) = positions(world[HOME].store, DAY, HOME)
    assert (mine.counterparty, theirs.counterparty) == (HOME, SERVING)
    assert (mine.receivable_fen, mine.payable_fen) == (533, 8625)
    assert mine.net_fen == 533 - 8625
    assert (theirs.receivable_fen, theirs.payable_fen) == (8625, 533)
    assert mine.net_fen + theirs.net_fen == 0


async def test_three_districts_multilateral_nets_sum_to_zero(tmp_path: Path) -> None:
    """Every district's bilateral nets, summed over all districts, come to nothing."""
    world = World(tmp_path, (SERVING, HOME, THIRD))
    try:
        rides = {SERVING: {HOME: 3, THIRD: 1}, HOME: {SERVING: 2, THIRD: 5}, THIRD: {HOME: 4}}
        for serving, homes in rides.items():
            world[serving].record(
                *(
                    trip(card(home, "plain"), f"{home}-{i}")
                    for home, n in homes.items()
                    for i in range(n)
                )
            )
            await world.sender(serving).close(DAY)
        views = {c: positions(world[c].store, DAY, c) for c in (SERVING, HOME, THIRD)}
        # SERVING: 3 + 1 rides out, 2 in; HOME: 2 + 5 out, 3 + 4 in; THIRD: 4 out, 1 + 5 in.
        nets = {c: sum(p.net_fen for p in v) for c, v in views.items()}
        assert nets == {SERVING: 400, HOME: 0, THIRD: -400}
        assert sum(nets.values()) == 0
        assert [p.counterparty for p in views[THIRD]] == [SERVING, HOME]
    finally:
        world.close()


async def test_disputes_count_until_accepted_or_resolved(world: World) -> None:
    """A representment the home accepts is receivable (and payable there); resolving clears."""
    world[SERVING].record(
        trip(card(HOME, "lost"), "x-1"),
        trip(card(HOME, "plain"), "m-1", Entitlement.SENIOR_65),  # holds no such entitlement
    )
    sender = world.sender(SERVING)
    await sender.close(DAY)
    p = position(world[SERVING].store, HOME, DAY)
    assert (p.receivable_fen, p.open_disputes) == (0, 2)

    fixed = {"applied_entitlement": None, "charged_fen": 200, "concession_fen": 0}
    await sender.represent(HOME, "transit-01", "m-1", fixed)
    p = position(world[SERVING].store, HOME, DAY)
    assert (p.receivable_fen, p.open_disputes, p.state) == (200, 1, "provisional")
    assert position(world[HOME].store, SERVING, DAY).payable_fen == 200

    sender.resolve(HOME, "transit-01", "x-1", "card reported lost: operator bears it")
    p = position(world[SERVING].store, HOME, DAY)
    assert (p.receivable_fen, p.open_disputes) == (200, 0)


async def test_a_confirmed_day_is_settled_on_both_sides(world: World) -> None:
    world[SERVING].record(trip(card(HOME, "plain"), "p-1"))
    sender = world.sender(SERVING)
    await sender.close(DAY)
    assert position(world[SERVING].store, HOME, DAY).state == "provisional"
    world.now = SETTLE_AT
    await sender.close(DAY)  # the sealing close: nothing new to send
    await world.sender(HOME).close(DAY)  # the home seals its side too
    assert position(world[SERVING].store, HOME, DAY).state == "acked"
    await sender.confirm(HOME, DAY)
    assert position(world[SERVING].store, HOME, DAY).state == "settled"
    assert position(world[HOME].store, SERVING, DAY).state == "settled"


async def test_a_settled_day_reads_its_figures_from_the_signed_documents(world: World) -> None:
    """Once SETTLED, the figures are the signed ones, whatever the batch tables say later."""
    world[SERVING].record(trip(card(HOME, "plain"), "p-1"))
    sender = world.sender(SERVING)
    world.now = SETTLE_AT
    await sender.close(DAY)
    await world.sender(HOME).close(DAY)
    assert (await sender.confirm(HOME, DAY)).state == "settled"
    db = world[SERVING].store.db
    with db.write():  # a row changed behind the broker's back (a restore, a bad hand edit)
        db.execute(
            "UPDATE out_batches SET accepted_claim_fen = 99999 WHERE counterparty = ?", (HOME,)
        )
    settled = position(world[SERVING].store, HOME, DAY)
    assert (settled.state, settled.receivable_fen, settled.payable_fen) == ("settled", 200, 0)
    theirs = position(world[HOME].store, SERVING, DAY)
    assert (theirs.state, theirs.receivable_fen, theirs.payable_fen) == ("settled", 0, 200)


async def test_other_days_and_districts_are_not_counted(world: World) -> None:
    """A position is one counterparty's on one day: the next day's batch stays out."""
    world[SERVING].record(
        trip(card(HOME, "plain"), "d-1"),
        trip(card(HOME, "plain"), "d-2", at=AT + timedelta(days=1)),
        trip(card(HOME, "plain"), "d-3", at=AT + timedelta(days=1)),
    )
    sender = world.sender(SERVING)
    world.now = SETTLE_AT + timedelta(days=1)  # both days have ended
    await sender.close(DAY)
    await sender.close(DAY + timedelta(days=1))
    assert position(world[SERVING].store, HOME, DAY).receivable_fen == 200
    assert position(world[SERVING].store, HOME, DAY + timedelta(days=1)).receivable_fen == 400
    other = position(world[SERVING].store, THIRD, DAY)
    assert (other.receivable_fen, other.payable_fen, other.pending_batches) == (0, 0, 0)
    assert positions(world[SERVING].store, DAY - timedelta(days=1), SERVING) == []
