"""The serving district's side of clearing (broker.settlement.clearing.sender).

A real Sender of SERVING with its ledger and clearing store on disk; its peer
channel is a loopback to HOME's real Receiver (tests/settlement/clearing/pair.py),
so closes, representments and confirmations run end to end without a network,
and an unreachable or misbehaving home district can be staged. Expected claims
are written out by hand.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from broker.cards.model import Entitlement, Scene
from broker.core.errors import DocumentRefused, PeerUnavailable, SettlementStateError
from broker.core.signing import Purpose, Signed, Signer, unsigned_body, verify
from broker.settlement.clearing.positions import position
from broker.settlement.clearing.sender import BatchResult, CloseReport, Sender, line_for
from broker.settlement.ledger.store import seal_day
from broker.settlement.trips import ACCEPT, Judgement, Outcome, Reason
from tests.settlement.clearing.pair import (
    AT,
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
    trip,
)

FULL_FARE = {"applied_entitlement": None, "charged_fen": 200, "concession_fen": 0}


@pytest.fixture(params=["sqlite", "postgres"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path, ledger_url=backend_url(request))
    yield w
    w.close()


@pytest.fixture
def sender(world: World) -> Sender:
    return world.sender(SERVING)


def batches(world: World) -> list[tuple[Any, ...]]:
    return world[SERVING].store.db.all(
        "SELECT counterparty, period, seq, kind, lo, hi, state FROM out_batches "
        "ORDER BY period, counterparty, seq"
    )


def dispute(world: World, trip_id: str) -> tuple[Any, ...]:
    row = world[SERVING].store.db.one(
        "SELECT state, code, final_code, accepted_claim_fen, note FROM disputes WHERE trip_id = ?",
        (trip_id,),
    )
    assert row is not None, trip_id
    return row


# ---------------------------------------------------------------- lines


@pytest.mark.parametrize(
    ("kind", "scene", "entitlement", "scheme", "claimed"),
    [
        ("plain", Scene.BUS, None, "", 200),
        ("senior", Scene.BUS, Entitlement.SENIOR_65, "senior-bus-free", 200),
        ("student", Scene.BUS, Entitlement.STUDENT, "student-bus", 133),
        ("senior", Scene.SCENIC_AREA, Entitlement.SENIOR_60, "scenic-senior", 8625),
    ],
)
def test_a_line_carries_its_scheme_and_the_claim_under_the_agreement(
    world: World,
    kind: str,
    scene: Scene,
    entitlement: Entitlement | None,
    scheme: str,
    claimed: int,
) -> None:
    t = trip(card(HOME, kind), "t-1", entitlement, scene=scene)
    got = line_for(t, world[SERVING].cfg, world[SERVING].fares)
    assert (got.trip, got.scheme, got.claimed_fen) == (t, scheme, claimed)


def test_a_line_without_an_agreement_or_fare_rules_claims_accordingly(world: World) -> None:
    cfg, fares = world[SERVING].cfg, world[SERVING].fares
    student = trip(card(HOME, "student"), "t-1", Entitlement.STUDENT)
    assert line_for(replace(student, card=card(THIRD, "student")), cfg, fares).claimed_fen == 0
    # No scheme known: the concession earns no share, the charged fare is still claimed.
    no_rules = line_for(student, cfg, None)
    assert (no_rules.scheme, no_rules.claimed_fen) == ("", 100)
    unknown = line_for(replace(student, fare_version="ghost-9"), cfg, fares)
    assert (unknown.scheme, unknown.claimed_fen) == ("", 100)


# ---------------------------------------------------------------- planning a close


def test_nothing_to_close_plans_nothing(world: World, sender: Sender) -> None:
    """No trips, or only the district's own card-holders' or refused ones: no close."""
    assert sender.plan_close(DAY) is None
    world[SERVING].record(trip(card(SERVING, "plain"), "own-1"))
    refused = Judgement(Outcome.REJECTED, Reason.BAD_AMOUNTS)
    world[SERVING].ledger.record([(trip(card(HOME, "plain"), "bad-1"), refused)], NOW)
    assert sender.plan_close(DAY) is None
    assert world[SERVING].store.db.all("SELECT * FROM day_closes") == []
    assert batches(world) == []


def test_a_close_fixes_one_batch_per_home_and_resumes_until_acknowledged(
    world: World, sender: Sender
) -> None:
    world[SERVING].record(
        trip(card(HOME, "plain"), "p-1"),
        trip(card(SERVING, "plain"), "own-1"),
        trip(card(HOME, "plain"), "p-2"),
        trip(card(HOME, "plain"), "next-day", at=AT + timedelta(days=1)),
    )
    assert sender.plan_close(DAY) == 1
    assert batches(world) == [(HOME, DAY.isoformat(), 1, "close", 0, 4, "built")]
    assert sender.plan_close(DAY) == 1  # a batch of close 1 is still unacknowledged
    assert len(batches(world)) == 1
    closes = world[SERVING].store.db.all("SELECT period, close_no, watermark FROM day_closes")
    assert closes == [(DAY.isoformat(), 1, 4)]


async def test_a_trip_after_the_close_goes_in_the_next_close_of_its_day(
    world: World, sender: Sender
) -> None:
    world[SERVING].record(trip(card(HOME, "plain"), "p-1"), trip(card(HOME, "plain"), "p-2"))
    first = await sender.close(DAY)
    assert (first.close_no, [b.lines for b in first.batches]) == (1, [2])
    assert sender.plan_close(DAY) is None  # nothing new since
    world[SERVING].record(trip(card(HOME, "plain"), "late-1", at=AT + timedelta(hours=5)))
    second = await sender.close(DAY)
    assert second.close_no == 2
    assert [(b.sequence, b.lines, b.claimed_fen) for b in second.batches] == [(2, 1, 200)]
    assert [b[2:] for b in batches(world)] == [
        (1, "close", 0, 2, "acked"),
        (2, "close", 2, 3, "acked"),
    ]
    assert position(world[SERVING].store, HOME, DAY).receivable_fen == 600


async def test_a_home_district_that_is_not_a_peer_keeps_its_batch_and_is_reported_unsent(
    world: World, sender: Sender
) -> None:
    """An accepted trip is never left behind: its batch waits for the peer, and says so."""
    world[SERVING].record(trip(card(THIRD, "plain"), "t-1"), trip(card(HOME, "plain"), "p-1"))
    report = await sender.close(DAY)
    assert [b.counterparty for b in report.batches] == [HOME]  # sent to the peer
    [failure] = report.failures
    assert failure.startswith(f"district {THIRD}: not a configured peer")
    assert sorted(b[0] for b in batches(world)) == sorted([HOME, THIRD])  # kept, built
    # A later trip for the peer is still closed: the waiting batch does not hold the day.
    world[SERVING].record(trip(card(HOME, "plain"), "p-2"))
    again = await sender.close(DAY)
    assert [b.counterparty for b in again.batches] == [HOME]
    assert len(again.failures) == 1


# ---------------------------------------------------------------- sending


async def test_a_close_publishes_the_fare_rules_then_sends_and_stores_the_ack(
    world: World, sender: Sender
) -> None:
    world[SERVING].record(
        trip(card(HOME, "plain"), "p-1"),
        trip(card(HOME, "senior"), "s-1", Entitlement.SENIOR_65),
        trip(card(HOME, "lost"), "x-1"),
    )
    report = await sender.close(DAY)
    assert [ch.calls for ch in world.channels] == [["PublishFares"], ["ExchangeBatch"]]
    assert report.failures == []
    assert report.batches == [
        BatchResult(HOME, DAY.isoformat(), 1, "close", 3, 600, 400, 1, 0),
    ]
    acked = world[SERVING].store.db.one(
        "SELECT state, lines, claimed_fen, accepted_claim_fen, ack_key_id FROM out_batches"
    )
    assert acked == ("acked", 3, 600, 400, world[HOME].signer.key_id)
    verdicts = world[SERVING].store.db.all("SELECT line_no, trip_id, code FROM out_verdicts")
    assert verdicts == [(2, "x-1", "CARD_NOT_ACTIVE")]  # lines go in order of travel, then id
    assert dispute(world, "x-1") == ("open", "CARD_NOT_ACTIVE", None, None, None)


async def test_an_unreachable_home_leaves_its_batch_built_for_the_next_run(
    world: World, sender: Sender
) -> None:
    world[SERVING].record(trip(card(HOME, "plain"), "p-1"))
    world.down.add(HOME)
    report = await sender.close(DAY)
    assert report.batches == [] and len(report.failures) == 1
    assert HOME in report.failures[0] and "UNAVAILABLE" in report.failures[0]
    assert [b[-1] for b in batches(world)] == ["built"]
    with pytest.raises(PeerUnavailable):
        await sender.send(HOME, DAY, 1)
    world.down.clear()
    again = await sender.close(DAY)
    assert (again.close_no, again.failures, len(again.batches)) == (1, [], 1)
    assert [b[-1] for b in batches(world)] == ["acked"]


def resigned(world: World, **changes: Any):
    """An acknowledgement HOME signs over again with some figures changed."""

    def alter(ack: Signed) -> Signed:
        return world[HOME].signer.sign({**ack.content(), **changes}, Purpose.ACK)

    return alter


def stranger_signed(ack: Signed) -> Signed:
    """The same acknowledgement, signed by a key no bundle lists."""
    return Signer(ed25519.Ed25519PrivateKey.generate()).sign(
        unsigned_body(ack.content()), Purpose.ACK
    )


@pytest.mark.parametrize(
    ("alter", "match"),
    [
        (lambda w: stranger_signed, "not trusted"),
        (lambda w: resigned(w, sequence=2), "does not match"),
        (lambda w: resigned(w, to=THIRD), "does not match"),
        (lambda w: resigned(w, lines=3), "does not match"),
        (lambda w: resigned(w, verdicts_digest="0" * 64), "does not match"),
        (lambda w: resigned(w, accepted_claim_fen=201), "does not add up"),
    ],
)
async def test_an_acknowledgement_that_does_not_answer_the_batch_is_refused(
    world: World, sender: Sender, alter, match: str
) -> None:
    world[SERVING].record(trip(card(HOME, "plain"), "p-1"), trip(card(HOME, "lost"), "x-1"))
    world.alter_ack[HOME] = alter(world)
    report = await sender.close(DAY)  # reported, not raised: other homes still get theirs
    [failure] = report.failures
    assert failure.startswith(f"district {HOME}: ") and match in failure
    assert report.batches == []
    with pytest.raises(DocumentRefused, match=match):  # sending it alone says the same
        await sender.send(HOME, DAY, 1)
    assert [b[-1] for b in batches(world)] == ["built"]
    assert world[SERVING].store.db.all("SELECT * FROM out_verdicts") == []
    assert world[SERVING].store.disputes() == []


async def test_sending_needs_a_batch_and_a_configured_peer(world: World, sender: Sender) -> None:
    with pytest.raises(SettlementStateError, match="no batch"):
        await sender.send(HOME, DAY, 1)
    with pytest.raises(SettlementStateError, match="not a configured peer"):
        await sender.publish_fares(THIRD)


async def test_a_district_without_fare_rules_publishes_nothing(world: World) -> None:
    d = world[SERVING]
    quiet = Sender(
        d.cfg, d.store, d.signer, None, lambda home: pytest.fail("no call"), world.keys, lambda: NOW
    )
    assert await quiet.publish_fares(HOME) == []


# ---------------------------------------------------------------- disputes


async def close_with_disputes(world: World, sender: Sender) -> None:
    world[SERVING].record(
        trip(card(HOME, "lost"), "x-1"),  # CARD_NOT_ACTIVE: nothing to correct
        trip(card(HOME, "plain"), "m-1", Entitlement.SENIOR_65),  # not a senior
        trip(card(HOME, "plain"), "m-2", Entitlement.SENIOR_65),
    )
    await sender.close(DAY)
    assert [d["state"] for d in world[SERVING].store.disputes()] == ["open"] * 3


@pytest.mark.parametrize("note", ["", "   ", "\n\t"])
async def test_a_resolution_needs_a_note(world: World, sender: Sender, note: str) -> None:
    await close_with_disputes(world, sender)
    with pytest.raises(SettlementStateError, match="needs a note"):
        sender.resolve(HOME, OPERATOR, "x-1", note)
    assert dispute(world, "x-1") == ("open", "CARD_NOT_ACTIVE", None, None, None)


async def test_resolve_closes_an_open_dispute_once(world: World, sender: Sender) -> None:
    await close_with_disputes(world, sender)
    sender.resolve(HOME, OPERATOR, "x-1", "card reported lost: operator bears it")
    assert dispute(world, "x-1") == (
        "resolved",
        "CARD_NOT_ACTIVE",
        None,
        None,
        "card reported lost: operator bears it",
    )
    with pytest.raises(SettlementStateError, match="no open or finally rejected"):
        sender.resolve(HOME, OPERATOR, "x-1", "again")
    with pytest.raises(SettlementStateError):
        sender.resolve(HOME, OPERATOR, "never-1", "no such trip")
    with pytest.raises(SettlementStateError):
        sender.resolve(THIRD, OPERATOR, "m-1", "the dispute is with HOME")


async def test_a_corrected_line_is_represented_once_and_accepted(
    world: World, sender: Sender
) -> None:
    await close_with_disputes(world, sender)
    result = await sender.represent(HOME, OPERATOR, "m-1", FULL_FARE)
    assert (result.kind, result.sequence, result.accepted_claim_fen) == ("represent", 2, 200)
    assert dispute(world, "m-1") == ("accepted", "ENTITLEMENT_MISMATCH", None, 200, None)
    with pytest.raises(SettlementStateError, match="represented once"):
        await sender.represent(HOME, OPERATOR, "m-1", FULL_FARE)
    with pytest.raises(SettlementStateError, match="no open or finally rejected"):
        sender.resolve(HOME, OPERATOR, "m-1", "accepted already")
    assert len(batches(world)) == 2
    assert position(world[SERVING].store, HOME, DAY).receivable_fen == 200


async def test_a_representment_refused_again_is_final_and_may_then_be_resolved(
    world: World, sender: Sender
) -> None:
    await close_with_disputes(world, sender)
    still = {
        "applied_entitlement": Entitlement.SENIOR_60,
        "charged_fen": 100,
        "concession_fen": 100,
    }
    result = await sender.represent(HOME, OPERATOR, "m-2", still)
    assert (result.rejected, result.accepted_claim_fen) == (1, 0)
    assert dispute(world, "m-2") == (
        "final",
        "ENTITLEMENT_MISMATCH",
        "ENTITLEMENT_MISMATCH",
        0,
        None,
    )
    sender.resolve(HOME, OPERATOR, "m-2", "written off")
    assert dispute(world, "m-2")[0] == "resolved"


async def test_a_representment_in_flight_cannot_be_resolved_or_represented(
    world: World, sender: Sender
) -> None:
    await close_with_disputes(world, sender)
    world.down.add(HOME)
    with pytest.raises(PeerUnavailable):
        await sender.represent(HOME, OPERATOR, "m-1", FULL_FARE)
    assert dispute(world, "m-1")[0] == "represented"
    with pytest.raises(SettlementStateError):
        sender.resolve(HOME, OPERATOR, "m-1", "meanwhile")
    with pytest.raises(SettlementStateError, match="represented once"):
        await sender.represent(HOME, OPERATOR, "m-1", FULL_FARE)
    world.down.clear()
    await sender.send(HOME, DAY, 2)  # the built representment, sent again
    assert dispute(world, "m-1")[0] == "accepted"


async def test_only_a_dispute_can_be_represented(world: World, sender: Sender) -> None:
    world[SERVING].record(trip(card(HOME, "plain"), "p-1"))
    await sender.close(DAY)
    with pytest.raises(SettlementStateError, match="no dispute"):
        await sender.represent(HOME, OPERATOR, "p-1", FULL_FARE)
    assert len(batches(world)) == 1


# ---------------------------------------------------------------- confirming the day


async def test_a_day_is_confirmed_only_when_nothing_is_pending_or_disputed(
    world: World, sender: Sender
) -> None:
    await close_with_disputes(world, sender)
    with pytest.raises(SettlementStateError, match=r"provisional until .*2026-03-14T00:05\+08:00"):
        await sender.confirm(HOME, DAY)
    world.now = SETTLE_AT
    with pytest.raises(SettlementStateError, match="no close has run since"):
        await sender.confirm(HOME, DAY)
    world[SERVING].record(trip(card(HOME, "plain"), "late-1"))  # arrived inside the window
    assert sender.plan_close(DAY) == 2  # the sealing close covers it
    with pytest.raises(SettlementStateError, match=r"1 batch.*3 dispute"):
        await sender.confirm(HOME, DAY)
    for trip_id in ("x-1", "m-1", "m-2"):
        sender.resolve(HOME, OPERATOR, trip_id, "written off")
    await sender.close(DAY)
    with pytest.raises(SettlementStateError, match="no close has run since"):
        await sender.confirm(HOME, DAY)  # the home has not sealed its side of the day
    assert world.sender(HOME).plan_close(DAY) is None
    settled = await sender.confirm(HOME, DAY)
    assert (settled.state, settled.receivable_fen, settled.payable_fen) == ("settled", 200, 0)
    row = world[SERVING].store.db.one("SELECT receivable_fen, payable_fen, state FROM positions")
    assert row == (200, 0, "settled")
    assert position(world[HOME].store, SERVING, DAY).state == "settled"


async def settled_day(world: World, sender: Sender) -> None:
    """DAY with one plain trip, closed, sealed on both sides and confirmed (200 receivable)."""
    world[SERVING].record(trip(card(HOME, "plain"), "p-1"))
    await sender.close(DAY)
    world.now = SETTLE_AT
    await sender.close(DAY)
    await world.sender(HOME).close(DAY)
    assert (await sender.confirm(HOME, DAY)).state == "settled"


async def test_the_sealing_close_covers_trips_after_a_batch_still_waiting(
    world: World, sender: Sender
) -> None:
    """A batch left unacknowledged (home down) does not make the sealing close skip the trips
    that came after it: else the day would settle without them, and their batch be refused."""
    world[SERVING].record(trip(card(HOME, "plain"), "t-1"))
    world.down.add(HOME)
    assert (await sender.close(DAY)).failures  # batch 1 built, not sent
    world[SERVING].record(trip(card(HOME, "plain"), "t-2"))  # inside the late window
    world.down.clear()
    world.now = SETTLE_AT
    report = await sender.close(DAY)  # sends batch 1, and plans and sends batch 2
    assert [(b.sequence, b.lines) for b in report.batches] == [(1, 1), (2, 1)]
    assert world.sender(HOME).plan_close(DAY) is None
    settled = await sender.confirm(HOME, DAY)
    assert (settled.state, settled.receivable_fen) == ("settled", 400)
    assert await sender.close(DAY) == CloseReport(DAY.isoformat(), None)  # nothing left over


async def test_a_day_is_not_confirmed_while_an_accepted_trip_is_in_no_batch(
    world: World, sender: Sender
) -> None:
    """Sealed by a close that planned nothing (its batch waited): the trip after it holds
    the confirmation until a close puts it in a batch."""
    world[SERVING].record(trip(card(HOME, "plain"), "t-1"))
    await sender.close(DAY)
    world.now = SETTLE_AT
    assert world.sender(HOME).plan_close(DAY) is None
    world[SERVING].record(trip(card(HOME, "plain"), "t-2"))
    db = world[SERVING].store.trips
    with db.write():  # the day sealed without a close planning t-2 (what the fix prevents)
        seal_day(db, DAY, SETTLE_AT)
    with pytest.raises(SettlementStateError, match="1 accepted trip"):
        await sender.confirm(HOME, DAY)
    await sender.close(DAY)
    assert (await sender.confirm(HOME, DAY)).receivable_fen == 400


async def test_a_late_trip_cannot_change_a_settled_day(world: World, sender: Sender) -> None:
    """Still inside the 72 h by the gate's clock or not: the sealed ledger refuses it too_late."""
    await settled_day(world, sender)
    [late] = world[SERVING].ledger.record(
        [(trip(card(HOME, "plain"), "late-1", at=AT + timedelta(hours=1)), ACCEPT)], SETTLE_AT
    )
    assert (late.outcome.value, late.reason.value) == ("rejected", "too_late")
    assert sender.plan_close(DAY) is None  # nothing accepted to send
    p = position(world[SERVING].store, HOME, DAY)
    assert (p.state, p.receivable_fen, p.payable_fen) == ("settled", 200, 0)
    # a trip recorded before the seal is still answered with its stored outcome
    [again] = world[SERVING].ledger.record([(trip(card(HOME, "plain"), "p-1"), ACCEPT)], SETTLE_AT)
    assert again.outcome.value == "accepted"


async def test_confirm_of_a_settled_day_reports_the_stored_documents_without_asking(
    world: World, sender: Sender
) -> None:
    await settled_day(world, sender)
    world.down.add(HOME)  # every node stopped
    calls = len(world.channels)
    again = await sender.confirm(HOME, DAY)
    assert (again.state, again.receivable_fen, again.payable_fen) == ("settled", 200, 0)
    assert len(world.channels) == calls  # no channel was even opened
    stored = world[SERVING].store.db.all(
        "SELECT side, document FROM position_documents ORDER BY side"
    )
    own, theirs = (json.loads(doc) for _, doc in stored)
    assert [side for side, _ in stored] == ["own", "theirs"]
    assert (own["from"], own["receivable_fen"], theirs["from"], theirs["payable_fen"]) == (
        SERVING,
        200,
        HOME,
        200,
    )


async def test_an_unsettled_day_is_not_reported_settled_while_the_home_is_down(
    world: World, sender: Sender
) -> None:
    world[SERVING].record(trip(card(HOME, "plain"), "p-1"))
    world.now = SETTLE_AT
    await sender.close(DAY)
    world.down.add(HOME)
    with pytest.raises(PeerUnavailable):
        await sender.confirm(HOME, DAY)
    assert position(world[SERVING].store, HOME, DAY).state == "acked"
    assert world[SERVING].store.db.all("SELECT * FROM position_documents") == []


@pytest.mark.parametrize(
    "change",
    [{"period": "2026-03-11"}, {"to": THIRD}, {"from": THIRD}, {"type": "ack"}],
)
async def test_a_reply_about_another_day_or_pair_is_refused(
    world: World, sender: Sender, change: dict[str, str]
) -> None:
    """The reply must be the home's, to us, about this day: anything else settles nothing."""
    world[SERVING].record(trip(card(HOME, "plain"), "p-1"))
    world.now = SETTLE_AT
    await sender.close(DAY)
    await world.sender(HOME).close(DAY)
    home = world.receiver(HOME)
    real = home.confirm

    def lying(caller: str, signed: Signed) -> Signed:
        doc = {**unsigned_body(verify(real(caller, signed), world.keys(HOME), Purpose.POSITION))}
        return world[HOME].signer.sign({**doc, **change}, Purpose.POSITION)

    home.confirm = lying  # type: ignore[method-assign,assignment]
    with pytest.raises(DocumentRefused, match="not about 2026-03-10"):
        await sender.confirm(HOME, DAY)
    assert world[SERVING].store.db.all("SELECT * FROM position_documents") == []


async def test_a_bad_acknowledgement_from_one_home_does_not_hold_up_the_others(
    tmp_path: Path,
) -> None:
    world = World(tmp_path, (SERVING, HOME, THIRD))
    try:
        sender = world.sender(SERVING)
        world[SERVING].record(trip(card(HOME, "plain"), "p-1"), trip(card(THIRD, "plain"), "t-1"))
        world.alter_ack[HOME] = resigned(world, lines=3)
        report = await sender.close(DAY)
        assert [b.counterparty for b in report.batches] == [THIRD]
        [failure] = report.failures
        assert failure.startswith(f"district {HOME}: ") and "does not match" in failure
    finally:
        world.close()
