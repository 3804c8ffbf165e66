"""broker/settlement/clearing/confirm.py: when a day may be confirmed, and what is kept then.

Real clearing stores on disk (tests/settlement/clearing/pair.py); the exchanges
between the two sides are in test_sender.py and test_receiver.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.core.errors import SettlementStateError
from broker.core.signing import Purpose
from broker.settlement.clearing.confirm import (
    addressed,
    mirrors,
    position_doc,
    refuse_if_settled,
    require_ready,
    store_settled,
)
from broker.settlement.clearing.positions import Position, SettledDay, position, settled_day
from tests.settlement.clearing.pair import (
    DAY,
    HOME,
    NOW,
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


def test_readiness_needs_the_window_closed_then_a_sealing_close(world: World) -> None:
    store = world[SERVING].store
    with pytest.raises(SettlementStateError, match="provisional until"):
        require_ready(store, HOME, DAY, NOW)
    with pytest.raises(SettlementStateError, match="no close has run since"):
        require_ready(store, HOME, DAY, SETTLE_AT)
    world.now = SETTLE_AT
    assert world.sender(SERVING).plan_close(DAY) is None  # seals
    assert require_ready(store, HOME, DAY, SETTLE_AT) == Position(HOME, 0, 0, "acked")


def test_readiness_names_unacknowledged_batches(world: World) -> None:
    world[SERVING].record(trip(card(HOME, "plain"), "p-1"))
    world.now = SETTLE_AT
    assert world.sender(SERVING).plan_close(DAY) == 1  # built, not sent
    with pytest.raises(SettlementStateError, match=f"with {HOME}: 1 batch"):
        require_ready(world[SERVING].store, HOME, DAY, SETTLE_AT)


def test_a_position_document_is_addressed_and_mirrored_exactly() -> None:
    mine = Position(HOME, 500, 120, "acked")
    doc = position_doc(SERVING, HOME, DAY, mine)
    assert addressed(doc, SERVING, HOME, DAY)
    assert not addressed(doc, SERVING, THIRD, DAY)
    assert not addressed({**doc, "period": "2026-03-11"}, SERVING, HOME, DAY)
    assert not addressed({**doc, "type": "ack"}, SERVING, HOME, DAY)
    theirs = Position(SERVING, 120, 500, "acked")
    assert mirrors(doc, theirs)
    assert not mirrors(doc, mine)
    assert not mirrors({**doc, "payable_fen": 121}, theirs)


def test_storing_a_settled_day_keeps_both_documents_once(world: World) -> None:
    db = world[SERVING].store.db
    signer = world[SERVING].signer
    mine = Position(HOME, 200, 0, "acked")
    own = signer.sign(position_doc(SERVING, HOME, DAY, mine), Purpose.POSITION)
    theirs = world[HOME].signer.sign(
        {**position_doc(HOME, SERVING, DAY, Position(SERVING, 0, 200, "acked")), "agreed": True},
        Purpose.POSITION,
    )
    assert settled_day(db, HOME, DAY) is None
    store_settled(db, HOME, DAY, mine, SettledDay(own, theirs), SETTLE_AT)
    store_settled(db, HOME, DAY, mine, SettledDay(own, theirs), SETTLE_AT)  # again: no change
    assert settled_day(db, HOME, DAY) == SettledDay(own, theirs)
    assert db.one("SELECT count(*) FROM position_documents") == (2,)
    p = position(world[SERVING].store, HOME, DAY)
    assert (p.state, p.receivable_fen, p.payable_fen) == ("settled", 200, 0)
    with pytest.raises(SettlementStateError, match="SETTLED"):
        refuse_if_settled(db, HOME, DAY)
    refuse_if_settled(db, THIRD, DAY)  # another counterparty: not settled


def test_a_day_settled_by_the_previous_release_is_settled_too(world: World) -> None:
    """That release kept only the figures in ``positions``: no batch for the day either."""
    db = world[SERVING].store.db
    db.execute(
        "INSERT INTO positions (counterparty, period, receivable_fen, payable_fen, state, "
        "confirmed_at) VALUES (?, ?, 300, 100, 'settled', ?)",
        (HOME, DAY.isoformat(), SETTLE_AT.isoformat()),
    )
    with pytest.raises(SettlementStateError, match="SETTLED"):
        refuse_if_settled(db, HOME, DAY)
    p = position(world[SERVING].store, HOME, DAY)
    assert (p.state, p.receivable_fen, p.payable_fen) == ("settled", 300, 100)
