"""Operators' statements, each part labelled (broker.settlement.clearing.reports).

SERVING's two operators carry card-holders of HOME, THIRD and SERVING itself;
the day is closed against the home districts' real Receivers over a loopback
(tests/settlement/clearing/pair.py). Claimed and accepted amounts per home
district are written out by hand.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.cards.model import Entitlement, Scene
from broker.fares.agreements import Agreement
from broker.settlement.clearing.reports import operator_statement
from tests.settlement.clearing.pair import (
    AT,
    CAPPED_FARES,
    DAY,
    HOME,
    NOW,
    OPERATOR,
    SERVING,
    SETTLE_AT,
    THIRD,
    World,
    backend_url,
    card,
    sample_fares,
    trip,
)

SCENIC = "scenic-02"  # a second operator of SERVING


@pytest.fixture(params=["sqlite", "postgres"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path, (SERVING, HOME, THIRD), backend_url(request))
    w[SERVING].record(
        trip(card(HOME, "plain"), "p-1"),  # 200
        trip(card(HOME, "senior"), "s-1", Entitlement.SENIOR_65),  # 200
        trip(card(HOME, "lost"), "x-1"),  # 200 claimed, refused by HOME
        trip(card(HOME, "plain"), "m-1", Entitlement.SENIOR_65),  # 200 claimed, refused
        trip(card(THIRD, "student"), "st-1", Entitlement.STUDENT),  # 133
        trip(card(SERVING, "plain"), "own-1"),  # a local: nobody owes it
        trip(
            card(HOME, "senior"),
            "sc-1",
            Entitlement.SENIOR_60,
            scene=Scene.SCENIC_AREA,
            operator=SCENIC,
        ),  # 8625
    )
    yield w
    w.close()


def statement(world: World, operator_id: str | None = None) -> dict[str, dict[str, Any]]:
    d = world[SERVING]
    d.ledger  # noqa: B018 - the ledger file exists (the trips were recorded through it)
    lines = operator_statement(d.cfg, d.fares, d.store, DAY, operator_id)
    return {line.home_district: asdict(line) for line in lines}


def figures(line: dict[str, Any]) -> tuple[int, int, int, int]:
    return line["trips"], line["claimed_fen"], line["accepted_fen"], line["rejected_trips"]


def test_before_any_acknowledgement_nothing_is_accepted(world: World) -> None:
    got = statement(world)
    assert list(got) == [SERVING, THIRD, HOME]  # by district code
    assert figures(got[HOME]) == (5, 200 * 4 + 8625, 0, 0)
    assert figures(got[THIRD]) == (1, 133, 0, 0)
    assert figures(got[SERVING]) == (1, 0, 0, 0)
    assert (got[HOME]["gross_fen"], got[HOME]["concession_fen"]) == (
        4 * 200 + 11500,
        200 + 200 + 5750,
    )


async def test_claims_as_each_home_district_accepted_them(world: World) -> None:
    """HOME refused two lines; THIRD was not reached, so nothing of it counts as accepted."""
    world.down.add(THIRD)
    await world.sender(SERVING).close(DAY)
    got = statement(world)
    assert figures(got[HOME]) == (5, 9425, 9425 - 400, 2)
    assert figures(got[THIRD]) == (1, 133, 0, 0)
    assert figures(got[SERVING]) == (1, 0, 0, 0)


async def test_one_operators_statement_counts_only_its_own_refusals(world: World) -> None:
    await world.sender(SERVING).close(DAY)
    assert figures(statement(world, OPERATOR)[HOME]) == (4, 800, 400, 2)
    scenic = statement(world, SCENIC)
    assert list(scenic) == [HOME]
    assert figures(scenic[HOME]) == (1, 8625, 8625, 0)
    assert figures(statement(world, OPERATOR)[THIRD]) == (1, 133, 133, 0)
    assert statement(world, "nobody-9") == {}


async def test_a_representment_accepted_wins_its_claim_back(world: World) -> None:
    sender = world.sender(SERVING)
    await sender.close(DAY)
    fixed = {"applied_entitlement": None, "charged_fen": 200, "concession_fen": 0}
    await sender.represent(HOME, OPERATOR, "m-1", fixed)
    assert figures(statement(world)[HOME]) == (5, 9425, 9425 - 200, 1)
    assert figures(statement(world, SCENIC)[HOME]) == (1, 8625, 8625, 0)  # not this operator's
    sender.resolve(HOME, OPERATOR, "x-1", "written off")  # resolved: still not paid
    assert figures(statement(world, OPERATOR)[HOME]) == (4, 800, 600, 1)


async def test_a_ride_over_a_cap_loses_its_concession_but_is_not_a_refused_trip(
    tmp_path: Path,
) -> None:
    world = World(tmp_path)
    try:
        world[SERVING].fares = sample_fares(SERVING, CAPPED_FARES)  # half fares: 1 a month
        senior = card(HOME, "senior")
        world[SERVING].record(
            trip(senior, "h-1", Entitlement.SENIOR_60),
            trip(senior, "h-2", Entitlement.SENIOR_60, at=AT + timedelta(minutes=1)),
        )
        await world.sender(SERVING).close(DAY)
        # Each claims 100 charged + 50 of the concession; the second keeps only the 100.
        assert figures(statement(world)[HOME]) == (2, 300, 250, 0)
    finally:
        world.close()


def parts(line: dict[str, Any]) -> dict[str, int]:
    """Where each part of the claim stands."""
    names = ("claimed", "not_batched", "in_batch", "accepted", "disputed", "settled")
    return {n: line[f"{n}_fen"] for n in names}


async def test_a_supplementary_batch_not_yet_acknowledged_is_labelled_in_a_batch(
    world: World,
) -> None:
    """What the first batch's acknowledgement accepted stays accepted meanwhile."""
    sender = world.sender(SERVING)
    await sender.close(DAY)
    world[SERVING].record(trip(card(HOME, "plain"), "late-1", at=AT + timedelta(hours=3)))
    got = statement(world)[HOME]
    assert parts(got) == {  # the late trip: accepted in the ledger, in no batch yet
        "claimed": 9625,
        "not_batched": 200,
        "in_batch": 0,
        "accepted": 9425 - 400,
        "disputed": 400,
        "settled": 0,
    }
    assert sender.plan_close(DAY) == 2
    got = statement(world)[HOME]
    assert (got["not_batched_fen"], got["in_batch_fen"], got["accepted_fen"]) == (0, 200, 9025)
    assert figures(statement(world)[THIRD]) == (1, 133, 133, 0)  # all acknowledged
    await sender.close(DAY)
    assert figures(statement(world)[HOME]) == (6, 9625, 9625 - 400, 2)
    assert statement(world)[HOME]["in_batch_fen"] == 0


async def test_terms_changed_after_the_close_do_not_move_what_was_acknowledged(
    world: World,
) -> None:
    """The acknowledged part is the claim as sent; only trips in no batch use today's terms."""
    await world.sender(SERVING).close(DAY)
    before = statement(world)[HOME]
    world[SERVING].cfg = replace(  # the agreement with HOME renegotiated: no concession share
        world[SERVING].cfg,
        agreements=tuple(
            Agreement(a.district, a.collect_through_home, {}) if a.district == HOME else a
            for a in world[SERVING].cfg.agreements
        ),
    )
    world[SERVING].record(trip(card(HOME, "senior"), "s-2", Entitlement.SENIOR_65, at=AT))
    after = statement(world)[HOME]
    assert after["accepted_fen"] == before["accepted_fen"] == 9425 - 400
    assert after["claimed_fen"] == before["claimed_fen"] + 0  # s-2: 0 charged, no share now
    assert (after["not_batched_fen"], after["trips"]) == (0, 6)


async def test_disputed_claims_leave_the_dispute_when_resolved_or_won(world: World) -> None:
    sender = world.sender(SERVING)
    await sender.close(DAY)
    assert statement(world)[HOME]["disputed_fen"] == 400  # x-1 and m-1
    await sender.represent(
        HOME,
        OPERATOR,
        "m-1",
        {"applied_entitlement": None, "charged_fen": 200, "concession_fen": 0},
    )
    assert statement(world)[HOME]["disputed_fen"] == 200
    sender.resolve(HOME, OPERATOR, "x-1", "written off")
    assert statement(world)[HOME]["disputed_fen"] == 0


async def test_a_settled_day_labels_what_was_accepted_settled(world: World) -> None:
    sender = world.sender(SERVING)
    await sender.close(DAY)
    for trip_id in ("x-1", "m-1"):
        sender.resolve(HOME, OPERATOR, trip_id, "written off")
    assert statement(world)[HOME]["settled_fen"] == 0
    world.now = SETTLE_AT
    await sender.close(DAY)
    for other in (HOME, THIRD):
        await world.sender(other).close(DAY)
    assert (await sender.confirm(HOME, DAY)).state == "settled"
    got = statement(world)
    assert parts(got[HOME]) == {
        "claimed": 9425,
        "not_batched": 0,
        "in_batch": 0,
        "accepted": 9025,
        "disputed": 0,
        "settled": 9025,
    }
    assert got[THIRD]["settled_fen"] == 0  # not confirmed with THIRD


async def test_another_days_refusals_do_not_count(world: World) -> None:
    sender = world.sender(SERVING)
    next_day = DAY + timedelta(days=1)
    world[SERVING].record(trip(card(HOME, "lost"), "x-2", at=AT + timedelta(days=1)))
    world.now = NOW + timedelta(days=1)  # the next day has ended too
    await sender.close(next_day)
    assert figures(statement(world)[HOME]) == (5, 9425, 0, 0)  # DAY itself not closed yet
    await sender.close(DAY)
    assert figures(statement(world)[HOME]) == (5, 9425, 9425 - 400, 2)
