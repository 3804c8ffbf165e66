"""Disputes on the serving side (broker.settlement.clearing.disputes), called directly.

A real ledger and clearing store (tests/settlement/clearing/pair.py); each test
opens a dispute by hand, as storing a rejecting acknowledgement would, and
builds its representment. A representment is the same trip: only what a
rejection can be about may be corrected.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.cards.model import Entitlement, Scene
from broker.core.errors import SettlementStateError
from broker.settlement.clearing.batch import Line, decode_lines
from broker.settlement.clearing.disputes import build_represent, resolve
from broker.settlement.clearing.store import unb64
from broker.settlement.trips import Trip
from tests.settlement.clearing.pair import (
    AT,
    DAY,
    HOME,
    NOW,
    OPERATOR,
    SERVING,
    World,
    card,
    trip,
)

WHEN = NOW.isoformat()
FIRST = replace(
    trip(card(HOME, "plain"), "m-1", Entitlement.SENIOR_65), gate_id="gate-3", place_id="route-3"
)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    w[SERVING].record(FIRST)
    w[SERVING].store.db.execute(
        "INSERT INTO disputes (counterparty, period, operator_id, trip_id, code, state, "
        "updated_at) VALUES (?, ?, ?, ?, 'ENTITLEMENT_MISMATCH', 'open', ?)",
        (HOME, DAY.isoformat(), OPERATOR, "m-1", WHEN),
    )
    yield w
    w.close()


def as_line(t: Trip) -> Line:
    return Line(t, "", t.charged_fen)


def represent(world: World, corrections: dict[str, Any]) -> tuple[int, Any]:
    store = world[SERVING].store
    return build_represent(store, as_line, WHEN, HOME, OPERATOR, "m-1", corrections)


def state(world: World) -> tuple[Any, ...] | None:
    return world[SERVING].store.db.one(
        "SELECT state, represent_seq FROM disputes WHERE trip_id = 'm-1'"
    )


def built(world: World) -> list[Line]:
    rows = world[SERVING].store.db.all("SELECT payload FROM out_batches WHERE kind = 'represent'")
    return [x for (payload,) in rows for x in decode_lines(unb64(payload))]


FULL_FARE: dict[str, Any] = {"applied_entitlement": None, "charged_fen": 200, "concession_fen": 0}


@pytest.mark.parametrize(
    "changes",
    [
        {"card": card(HOME, "senior")},
        {"place_id": "route-9"},
        {"occurred_at": AT + timedelta(minutes=1)},
        {"gate_id": "gate-4"},
        {"gate_id": ""},
        {"scene": Scene.SCENIC_AREA},
        {"operator_id": "transit-02"},
        {"trip_id": "m-2"},
        {"no_such_field": 1},
    ],
)
def test_a_correction_of_what_makes_it_the_trip_is_refused_and_nothing_is_built(
    world: World, changes: dict[str, Any]
) -> None:
    [name] = changes
    with pytest.raises(SettlementStateError, match=f"not {name}: it must be the same trip"):
        represent(world, {**FULL_FARE, **changes})
    assert state(world) == ("open", None)  # it may still be represented, correctly
    assert built(world) == []


def test_a_correction_of_the_entitlement_and_amounts_keeps_the_trip_whole(world: World) -> None:
    seq, day = represent(world, FULL_FARE)
    assert (seq, day) == (1, DAY)  # the day's first batch to HOME here
    [sent] = built(world)
    assert sent.trip == replace(FIRST, **FULL_FARE)
    assert sent.trip.presentment_digest() == FIRST.presentment_digest()
    assert sent.trip.gate_id == "gate-3"
    assert state(world) == ("represented", 1)
    with pytest.raises(SettlementStateError, match="represented once"):
        represent(world, FULL_FARE)


def the_dispute_is(world: World, code: str) -> None:
    world[SERVING].store.db.execute("UPDATE disputes SET code = ?", (code,))


@pytest.mark.parametrize("code", ["PRICE_MISMATCH", "UNPUBLISHED_FARES"])
def test_the_fare_version_and_gross_fare_may_be_corrected_when_the_price_was_disputed(
    world: World, code: str
) -> None:
    """A rejection about the rules priced by lets the representment correct them."""
    the_dispute_is(world, code)
    fixed = {"fare_version": "sample-2", "gross_fare_fen": 300, **FULL_FARE, "charged_fen": 300}
    represent(world, fixed)
    [sent] = built(world)
    assert (sent.trip.fare_version, sent.trip.gross_fare_fen) == ("sample-2", 300)


def test_an_entitlement_dispute_does_not_correct_the_fare_version(world: World) -> None:
    fixed = {"fare_version": "sample-2", "gross_fare_fen": 300, **FULL_FARE, "charged_fen": 300}
    with pytest.raises(SettlementStateError, match="not fare_version"):
        represent(world, fixed)
    assert state(world) == ("open", None)


@pytest.mark.parametrize("code", ["CARD_NOT_ACTIVE", "UNKNOWN_CARD", "CLAIM_MISMATCH"])
def test_a_dispute_about_the_card_or_the_claim_corrects_nothing_in_the_trip(
    world: World, code: str
) -> None:
    the_dispute_is(world, code)
    with pytest.raises(SettlementStateError, match="may correct nothing"):
        represent(world, FULL_FARE)
    represent(world, {})  # presented again unchanged: the home may have fixed its records
    [sent] = built(world)
    assert sent.trip == FIRST


def test_corrected_amounts_that_do_not_add_up_are_refused(world: World) -> None:
    with pytest.raises(SettlementStateError, match="do not add up"):
        represent(world, {"applied_entitlement": None, "concession_fen": 0})
    assert state(world) == ("open", None)


def test_a_resolution_needs_a_note_and_an_open_dispute(world: World) -> None:
    db = world[SERVING].store.db
    with pytest.raises(SettlementStateError, match="needs a note"):
        resolve(db, WHEN, HOME, OPERATOR, "m-1", " ")
    resolve(db, WHEN, HOME, OPERATOR, "m-1", "written off")
    assert state(world) == ("resolved", None)
    with pytest.raises(SettlementStateError, match="no open or finally rejected"):
        resolve(db, WHEN, HOME, OPERATOR, "m-1", "again")
