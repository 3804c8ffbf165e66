"""The home district's side of clearing (broker.settlement.clearing.receiver), called directly.

No gRPC: the Receiver of HOME is handed what its servicer would hand it (the
caller's district, the spooled chunks, the signed trailer). Batches are signed
with SERVING's real settlement key; every expected figure is written out by hand
(tests/settlement/clearing/pair.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from broker._proto.yikatong.v1 import settlement_pb2, types_pb2
from broker.cards.model import Entitlement
from broker.core.errors import BrokerError, Conflict, DocumentRefused, SettlementStateError
from broker.core.signing import Purpose, Signed, Signer, unsigned_body, verify
from broker.fares.rules import fares_document
from broker.settlement.clearing.batch import (
    Digest,
    Spool,
    decode_lines,
    decode_verdicts,
    encode_lines,
)
from broker.settlement.clearing.positions import position
from broker.settlement.clearing.receiver import Receiver
from broker.settlement.trips import ACCEPT, Trip, correctable_values
from broker.settlement.wire import trip_from_wire
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
    line,
    sample_fares,
    trip,
)


@pytest.fixture(params=["sqlite", "postgres"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path, ledger_url=backend_url(request))
    yield w
    w.close()


@pytest.fixture
def home(world: World) -> Receiver:
    """HOME's receiver, SERVING's sample fare rules already published to it."""
    rx = world.receiver(HOME)
    assert rx.publish_fares(SERVING, fares_doc(world[SERVING].signer)) == ["sample-1"]
    return rx


def fares_doc(signer: Signer, text: str | None = None, **extra: Any) -> Signed:
    fares = sample_fares(SERVING, text) if text else sample_fares(SERVING)
    doc = {"type": "fares", **fares_document(fares), "district": SERVING, **extra}
    return signer.sign(doc, Purpose.FARES)


def count(world: World, table: str) -> int:
    row = world[HOME].home_store.db.one(f"SELECT count(*) FROM {table}")
    assert row is not None
    return int(row[0])


def nothing_stored(world: World) -> bool:
    return all(count(world, t) == 0 for t in ("in_batches", "in_lines", "cap_usage"))


def ack_doc(world: World, signed: Signed) -> dict[str, Any]:
    """The acknowledgement's content, verified under HOME's settlement key."""
    return verify(signed, world.keys(HOME), Purpose.ACK)


MIXED = [  # line numbers 0-4
    line(trip(card(HOME, "plain"), "p-1")),  # accepted: 200
    line(trip(card(HOME, "lost"), "x-1")),  # CARD_NOT_ACTIVE
    line(trip(card(HOME, "senior"), "s-1", Entitlement.SENIOR_65)),  # accepted: 200
    line(trip(card(THIRD, "plain"), "w-1")),  # WRONG_DISTRICT
    line(trip(card(HOME, "plain"), "p-1")),  # the first line again: DUPLICATE
]


# ---------------------------------------------------------------- fare rules


def test_published_fare_rules_are_stored_once_per_version(world: World, home: Receiver) -> None:
    """Publishing the same rules again changes nothing and answers the same versions."""
    before = world[HOME].home_store.db.all("SELECT * FROM published_fares")
    assert [(r[0], r[1]) for r in before] == [(SERVING, "sample-1")]
    assert home.publish_fares(SERVING, fares_doc(world[SERVING].signer)) == ["sample-1"]
    assert world[HOME].home_store.db.all("SELECT * FROM published_fares") == before


def test_lines_are_priced_only_by_rules_the_sender_published(world: World) -> None:
    rx = world.receiver(HOME)
    spool, trailer = world.batch([MIXED[0]])
    ack = rx.receive(SERVING, spool, trailer)
    (verdict,) = decode_verdicts(next(iter(ack.chunks)))
    assert verdict.code == "UNPUBLISHED_FARES"


@pytest.mark.parametrize(
    "make",
    [
        lambda w: fares_doc(Signer(ed25519.Ed25519PrivateKey.generate())),  # a key not in bundle
        lambda w: Signed(  # SERVING's key id, another key's signature
            fares_doc(w[SERVING].signer).document,
            w[SERVING].signer.key_id,
            fares_doc(Signer(ed25519.Ed25519PrivateKey.generate())).signature,
        ),
        lambda w: fares_doc(w[HOME].signer),  # HOME's own key, not the caller's
        lambda w: fares_doc(w[SERVING].signer, type="batch"),
        lambda w: fares_doc(w[SERVING].signer, district=THIRD),  # rules of another district
    ],
)
def test_fare_rules_not_signed_by_the_caller_for_itself_are_refused(world: World, make) -> None:
    with pytest.raises(DocumentRefused):
        world.receiver(HOME).publish_fares(SERVING, make(world))
    assert count(world, "published_fares") == 0


def test_a_published_version_never_changes(world: World, home: Receiver) -> None:
    """Other content under a held version is a conflict; a new version beside it is undone."""
    held = world[HOME].home_store.db.all("SELECT * FROM published_fares")
    changed = fares_doc(world[SERVING].signer, CAPPED_FARES)
    with pytest.raises(Conflict):
        home.publish_fares(SERVING, changed)
    doc = fares_document(sample_fares(SERVING, CAPPED_FARES))
    newer = dict(doc["table"][0], version="sample-2", effective_from="2019-01-01")
    both = world[SERVING].signer.sign(
        {"type": "fares", "district": SERVING, "table": [doc["table"][0], newer]}, Purpose.FARES
    )
    with pytest.raises(Conflict):
        home.publish_fares(SERVING, both)
    assert world[HOME].home_store.db.all("SELECT * FROM published_fares") == held
    # The new version on its own is welcome.
    alone = world[SERVING].signer.sign(
        {"type": "fares", "district": SERVING, "table": [newer]}, Purpose.FARES
    )
    assert home.publish_fares(SERVING, alone) == ["sample-2"]
    assert count(world, "published_fares") == 2


def test_fare_rules_that_do_not_parse_are_not_stored(world: World) -> None:
    bad = world[SERVING].signer.sign(
        {"type": "fares", "district": SERVING, "table": [{"version": "v1"}]},  # no effective_from
        Purpose.FARES,
    )
    with pytest.raises(BrokerError):
        world.receiver(HOME).publish_fares(SERVING, bad)
    assert count(world, "published_fares") == 0


# ---------------------------------------------------------------- batches


def test_a_good_batch_is_answered_with_signed_verdicts_and_stored(
    world: World, home: Receiver
) -> None:
    spool, trailer = world.batch(MIXED)
    ack = home.receive(SERVING, spool, trailer)
    doc = ack_doc(world, ack.signed)
    header = trailer.content()
    assert doc["type"] == "ack" and (doc["from"], doc["to"]) == (HOME, SERVING)
    assert (doc["period"], doc["sequence"], doc["kind"]) == (DAY.isoformat(), 1, "close")
    assert doc["batch_digest"] == header["digest"]
    assert (doc["lines"], doc["accepted"], doc["rejected"], doc["cap_exceeded"]) == (5, 2, 3, 0)
    assert (doc["claimed_fen"], doc["accepted_claim_fen"]) == (1000, 400)
    verdicts = [v for c in ack.chunks for v in decode_verdicts(c)]
    assert [(v.line_no, v.trip_id, v.code) for v in verdicts] == [
        (1, "x-1", "CARD_NOT_ACTIVE"),
        (3, "w-1", "WRONG_DISTRICT"),
        (4, "p-1", "DUPLICATE"),
    ]
    assert all((v.claimed_fen, v.accepted_claim_fen) == (200, 0) for v in verdicts)
    digest = Digest()
    for c in ack.chunks:
        digest.update(c)
    assert (doc["verdicts_digest"], doc["verdict_chunks"]) == (digest.hexdigest(), 1)
    # The lines kept are the ones judged on their own: not the duplicate, not another's card.
    stored = world[HOME].home_store.db.all(
        "SELECT trip_id, code, attempt, accepted_claim_fen FROM in_lines ORDER BY trip_id"
    )
    assert stored == [
        ("p-1", "ACCEPTED", 1, 200),
        ("s-1", "ACCEPTED", 1, 200),
        ("x-1", "CARD_NOT_ACTIVE", 1, 0),
    ]
    assert position(world[HOME].home_store, SERVING, DAY).payable_fen == 400


def test_the_same_batch_again_gets_the_same_ack_and_counts_once(
    world: World, home: Receiver
) -> None:
    first = home.receive(SERVING, *world.batch(MIXED))
    tables = ("in_batches", "in_lines", "cap_usage", "in_ack_chunks")
    counts = [count(world, t) for t in tables]
    again = home.receive(SERVING, *world.batch(MIXED))
    assert again == first
    assert [count(world, t) for t in tables] == counts
    assert position(world[HOME].home_store, SERVING, DAY).payable_fen == 400


def test_other_content_under_a_used_sequence_is_a_conflict(world: World, home: Receiver) -> None:
    home.receive(SERVING, *world.batch(MIXED))
    other = [line(trip(card(HOME, "plain"), "p-9"))]
    with pytest.raises(Conflict):
        home.receive(SERVING, *world.batch(other))
    assert count(world, "in_batches") == 1 and count(world, "in_lines") == 3
    # The same sequence on another day is another batch.
    other_day = [line(trip(card(HOME, "plain"), "p-9", at=AT + timedelta(days=1)))]
    spool, trailer = world.batch(other_day, period=DAY + timedelta(days=1))
    assert ack_doc(world, home.receive(SERVING, spool, trailer).signed)["accepted"] == 1


def test_lines_sent_again_under_a_new_sequence_are_duplicates(world: World, home: Receiver) -> None:
    home.receive(SERVING, *world.batch(MIXED[:3]))
    ack = home.receive(SERVING, *world.batch(MIXED[:3], seq=2))
    doc = ack_doc(world, ack.signed)
    assert (doc["accepted"], doc["rejected"], doc["accepted_claim_fen"]) == (0, 3, 0)
    assert {v.code for v in decode_verdicts(next(iter(ack.chunks)))} == {"DUPLICATE"}
    assert position(world[HOME].home_store, SERVING, DAY).payable_fen == 400


def test_chunks_changed_after_signing_are_refused_and_nothing_is_kept(
    world: World, home: Receiver
) -> None:
    _, trailer = world.batch(MIXED)
    changed = [line(MIXED[0].trip, claimed=300), *MIXED[1:]]
    spool, _ = world.batch(changed)
    with pytest.raises(DocumentRefused, match="digest"):
        home.receive(SERVING, spool, trailer)
    assert nothing_stored(world)
    ack = home.receive(SERVING, *world.batch(MIXED))  # now accepted
    assert ack_doc(world, ack.signed)["accepted"] == 2


@pytest.mark.parametrize(
    "lie",
    [
        {"lines": 4},
        {"gross_fen": 1001},
        {"charged_fen": 799},
        {"concession_fen": 201},
        {"claimed_fen": 1200},
    ],
)
def test_totals_that_do_not_add_up_refuse_the_batch_and_undo_its_checks(
    world: World, home: Receiver, lie: dict[str, Any]
) -> None:
    with pytest.raises(DocumentRefused, match="totals"):
        home.receive(SERVING, *world.batch(MIXED, overrides=lie))
    assert nothing_stored(world)


@pytest.mark.parametrize(
    ("overrides", "drop", "match"),
    [
        ({"type": "ack"}, (), "not a batch header"),
        ({"from": THIRD}, (), "not a batch header"),  # not the caller's batch
        ({"to": THIRD}, (), "addressed to"),
        ({"chunks": 2}, (), "digest"),
        ({"kind": "refund"}, (), "close or represent"),
        ({"period": "10 March"}, (), "field 'period' is not a date"),
        ({"sequence": "one"}, (), "field 'sequence' must be an integer"),
        ({}, ("period",), "field 'period' is required"),
        ({}, ("kind",), "field 'kind' is required"),
    ],
)
def test_a_trailer_that_does_not_describe_this_batch_is_refused(
    world: World,
    home: Receiver,
    overrides: dict[str, Any],
    drop: tuple[str, ...],
    match: str,
) -> None:
    spool, trailer = world.batch(MIXED, overrides=overrides, drop=drop)
    with pytest.raises(DocumentRefused, match=match):
        home.receive(SERVING, spool, trailer)
    assert nothing_stored(world)


def test_a_trailer_signed_by_another_key_is_refused(world: World, home: Receiver) -> None:
    stranger = Signer(ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(DocumentRefused, match="not trusted"):
        home.receive(SERVING, *world.batch(MIXED, stranger))
    spool, trailer = world.batch(MIXED)
    flipped = bytes([trailer.signature[0] ^ 1]) + trailer.signature[1:]  # one bit of R changed
    forged = Signed(trailer.document, trailer.key_id, flipped)
    with pytest.raises(DocumentRefused, match="does not verify"):
        home.receive(SERVING, spool, forged)
    assert nothing_stored(world)


def trailer_for(world: World, spool: Spool, **totals: int) -> Signed:
    doc = {"lines": 0, "gross_fen": 0, "charged_fen": 0, "concession_fen": 0, "claimed_fen": 0}
    doc.update(totals)
    return world[SERVING].signer.sign(
        {
            "type": "batch",
            "from": SERVING,
            "to": HOME,
            "period": DAY.isoformat(),
            "sequence": 1,
            "kind": "close",
            **doc,
            "digest": spool.digest.hexdigest(),
            "chunks": spool.digest.chunks,
        },
        Purpose.BATCH,
    )


def test_a_chunk_of_garbage_refuses_the_batch(world: World, home: Receiver) -> None:
    """Garbage bytes, signed as sent: the digest holds but the lines cannot be read."""
    spool = world.spool(b"\xff\xfe not protobuf \x00\x01")
    with pytest.raises(DocumentRefused, match="does not parse"):
        home.receive(SERVING, spool, trailer_for(world, spool))
    assert nothing_stored(world)


def test_a_line_of_an_unknown_scene_refuses_the_batch(world: World, home: Receiver) -> None:
    good = line(trip(card(HOME, "plain"), "p-1"))
    odd = settlement_pb2.BatchLines(
        lines=[
            settlement_pb2.BatchLine(
                operator_id="transit-01",
                trip_id="q-1",
                card=types_pb2.CardRef(issuer_region=HOME, card_number="C5120210000001"),
                scene=77,  # type: ignore[arg-type]
                fare_version="sample-1",
            )
        ]
    ).SerializeToString()
    first, _ = world.batch([good])
    spool = world.spool(*first.chunks(), odd)
    with pytest.raises(DocumentRefused, match="unknown scene"):
        home.receive(SERVING, spool, trailer_for(world, spool, lines=2))
    assert nothing_stored(world)  # the good first chunk's line was written, then undone


def test_an_empty_batch_is_acknowledged_with_nothing_owed(world: World, home: Receiver) -> None:
    spool = world.spool()
    ack = home.receive(SERVING, spool, trailer_for(world, spool))
    doc = ack_doc(world, ack.signed)
    assert (doc["lines"], doc["accepted_claim_fen"], doc["verdict_chunks"]) == (0, 0, 0)
    assert list(ack.chunks) == []


def test_a_representment_is_checked_once_against_the_first_rejection(
    world: World, home: Receiver
) -> None:
    wrong = line(trip(card(HOME, "plain"), "m-1", Entitlement.SENIOR_65))  # not a senior
    ack = home.receive(SERVING, *world.batch([wrong]))
    assert decode_verdicts(next(iter(ack.chunks)))[0].code == "ENTITLEMENT_MISMATCH"
    fixed = [line(trip(card(HOME, "plain"), "m-1"))]
    ack = home.receive(SERVING, *world.batch(fixed, seq=2, kind="represent"))
    doc = ack_doc(world, ack.signed)
    assert (doc["kind"], doc["accepted"], doc["accepted_claim_fen"]) == ("represent", 1, 200)
    stored = world[HOME].home_store.db.one(
        "SELECT code, attempt, seq FROM in_lines WHERE trip_id = 'm-1'"
    )
    assert stored == ("ACCEPTED", 2, 2)
    # Once only; and a line never rejected cannot be represented.
    again = home.receive(SERVING, *world.batch(fixed, seq=3, kind="represent"))
    assert decode_verdicts(next(iter(again.chunks)))[0].code == "NOT_DISPUTED"
    fresh = [line(trip(card(HOME, "plain"), "new-1"))]
    never = home.receive(SERVING, *world.batch(fresh, seq=4, kind="represent"))
    assert decode_verdicts(next(iter(never.chunks)))[0].code == "NOT_DISPUTED"
    assert position(world[HOME].home_store, SERVING, DAY).payable_fen == 200


def test_own_operators_concessions_count_against_the_caps(world: World) -> None:
    """HOME's own free rides for its card-holders (from its ledger) use up the cap."""
    rx = world.receiver(HOME)
    rx.publish_fares(SERVING, fares_doc(world[SERVING].signer, CAPPED_FARES))  # 2 a month
    senior = card(HOME, "senior")
    world[HOME].ledger.record(
        [
            (trip(senior, "own-1", Entitlement.SENIOR_65, operator="bus-9"), ACCEPT),
            (trip(card(HOME, "senior_reissued"), "own-2", Entitlement.SENIOR_65), ACCEPT),
            (trip(senior, "own-3", operator="bus-9"), ACCEPT),  # a full fare: no concession
            (trip(card(SERVING, "senior"), "own-4", Entitlement.SENIOR_65), ACCEPT),  # a visitor
        ],
        NOW,
    )
    ride = [line(trip(senior, "s-1", Entitlement.SENIOR_65, at=AT + timedelta(hours=2)))]
    ack = rx.receive(SERVING, *world.batch(ride))
    doc = ack_doc(world, ack.signed)
    assert (doc["cap_exceeded"], doc["rejected"], doc["accepted_claim_fen"]) == (1, 0, 0)
    sources = world[HOME].home_store.db.all("SELECT source FROM cap_usage ORDER BY source")
    assert sources == [(f"{HOME}|bus-9|own-1",), (f"{HOME}|transit-01|own-2",)]
    assert world[HOME].home_store.meta("own_usage_seq") == "4"


# ---------------------------------------------------------------- day confirmation


def position_doc(world: World, receivable: int, payable: int, **extra: Any) -> Signed:
    return world[SERVING].signer.sign(
        {
            "type": "position",
            "from": SERVING,
            "to": HOME,
            "period": DAY.isoformat(),
            "receivable_fen": receivable,
            "payable_fen": payable,
            **extra,
        },
        Purpose.POSITION,
    )


def after_the_window(world: World) -> None:
    """Move every clock past DAY's late window and seal the day in HOME's ledger."""
    world.now = SETTLE_AT
    assert world.sender(HOME).plan_close(DAY) is None  # nothing of HOME's own to send


def test_equal_views_of_the_day_settle_it(world: World, home: Receiver) -> None:
    home.receive(SERVING, *world.batch(MIXED))
    after_the_window(world)
    reply = home.confirm(SERVING, position_doc(world, 400, 0))
    doc = verify(reply, world.keys(HOME), Purpose.POSITION)
    assert (doc["key_id"], doc["purpose"]) == (world[HOME].signer.key_id, "day-position")
    assert unsigned_body(doc) == {
        "type": "position",
        "from": HOME,
        "to": SERVING,
        "period": DAY.isoformat(),
        "receivable_fen": 0,
        "payable_fen": 400,
        "agreed": True,
    }
    assert position(world[HOME].home_store, SERVING, DAY).state == "settled"


@pytest.mark.parametrize(("receivable", "payable"), [(401, 0), (400, 1), (0, 400)])
def test_views_that_differ_are_answered_but_not_settled(
    world: World, home: Receiver, receivable: int, payable: int
) -> None:
    home.receive(SERVING, *world.batch(MIXED))
    after_the_window(world)
    reply = home.confirm(SERVING, position_doc(world, receivable, payable))
    doc = verify(reply, world.keys(HOME), Purpose.POSITION)
    assert doc["agreed"] is False and doc["payable_fen"] == 400
    assert position(world[HOME].home_store, SERVING, DAY).state == "acked"
    assert count(world, "positions") == 0


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"type": "ack"}, "not a position document"),
        ({"from": THIRD}, "not a position document"),
        ({"to": THIRD}, "not a position document"),
        ({"period": "yesterday"}, "field 'period' is not a date"),
    ],
)
def test_a_position_not_from_the_caller_or_without_its_day_is_refused(
    world: World, home: Receiver, extra: dict[str, Any], match: str
) -> None:
    with pytest.raises(DocumentRefused, match=match):
        home.confirm(SERVING, position_doc(world, 0, 0, **extra))
    assert count(world, "positions") == 0


def test_a_day_whose_late_window_is_open_is_not_confirmed(world: World, home: Receiver) -> None:
    """Before DAY's end + 72 h + 5 min the home's figures are provisional: FAILED_PRECONDITION."""
    home.receive(SERVING, *world.batch(MIXED))
    world.now = SETTLE_AT - timedelta(minutes=6)  # 2026-03-14 00:04 in Shanghai
    with pytest.raises(SettlementStateError, match=r"provisional until .* 2026-03-14T00:05\+08:00"):
        home.confirm(SERVING, position_doc(world, 400, 0))
    assert count(world, "positions") == count(world, "position_documents") == 0


def test_a_day_without_a_close_after_its_window_is_not_confirmed(
    world: World, home: Receiver
) -> None:
    """The window has closed, but no close of HOME's has sealed the day: a trip could still land."""
    home.receive(SERVING, *world.batch(MIXED))
    world.now = SETTLE_AT
    with pytest.raises(SettlementStateError, match="no close has run since"):
        home.confirm(SERVING, position_doc(world, 400, 0))
    assert count(world, "position_documents") == 0


def test_the_homes_own_unacknowledged_batch_holds_the_confirmation(world: World) -> None:
    """HOME's operators carried SERVING's card-holders too; HOME's batch is not acknowledged."""
    world[HOME].record(trip(card(SERVING, "plain"), "h-1"))
    world.now = SETTLE_AT
    world.down.add(SERVING)
    assert world.sender(HOME).plan_close(DAY) == 1  # sealed, batch built, not sent
    with pytest.raises(SettlementStateError, match="1 batch"):
        world.receiver(HOME).confirm(SERVING, position_doc(world, 0, 0))
    assert count(world, "position_documents") == 0


def test_a_settled_day_takes_no_batch_and_answers_again_with_the_same_document(
    world: World, home: Receiver
) -> None:
    home.receive(SERVING, *world.batch(MIXED))
    after_the_window(world)
    first = home.confirm(SERVING, position_doc(world, 400, 0))
    assert count(world, "position_documents") == 2  # ours and theirs
    again = home.confirm(SERVING, position_doc(world, 400, 0))
    assert again == first  # the stored document, byte for byte
    late = [line(trip(card(HOME, "plain"), "late-1"))]
    with pytest.raises(SettlementStateError, match="SETTLED"):
        home.receive(SERVING, *world.batch(late, seq=2))
    assert count(world, "in_batches") == 1
    p = position(world[HOME].home_store, SERVING, DAY)
    assert (p.state, p.payable_fen) == ("settled", 400)


# ---------------------------------------------------------------- a representment is the same trip


def gated(trip_id: str = "m-1", entitlement: Entitlement | None = None, **changes: Any) -> Trip:
    """A trip of HOME's plain card-holder at gate-3 (``changes`` applied after)."""
    base = trip(card(HOME, "plain"), trip_id, entitlement)
    return replace(base, **{"gate_id": "gate-3", **changes})


def presented(world: World, trip_id: str) -> Any:
    """The digest stored with a line's first presentment (beside the line, in ``in_lines``)."""
    db = world[HOME].home_store.db
    return db.one("SELECT digest FROM in_lines WHERE trip_id = ?", (trip_id,))


@pytest.mark.parametrize(
    "changes",
    [
        {"card": card(HOME, "senior")},
        {"place_id": "route-9"},
        {"occurred_at": AT + timedelta(minutes=1)},
        {"gate_id": "gate-4"},
        {"gate_id": ""},
    ],
    ids=["card", "place", "occurred_at", "gate", "no-gate"],
)
def test_a_representment_of_another_card_place_time_or_gate_is_not_the_same_trip(
    world: World, home: Receiver, changes: dict[str, Any]
) -> None:
    wrong = gated(entitlement=Entitlement.SENIOR_65)  # not a senior: ENTITLEMENT_MISMATCH
    home.receive(SERVING, *world.batch([line(wrong)]))
    first = presented(world, "m-1")
    assert first == (wrong.presentment_digest(),)
    other = line(gated(**changes))  # otherwise a good line, priced right
    ack = home.receive(SERVING, *world.batch([other], seq=2, kind="represent"))
    [verdict] = decode_verdicts(next(iter(ack.chunks)))
    assert (verdict.code, verdict.accepted_claim_fen) == ("NOT_SAME_TRIP", 0)
    doc = ack_doc(world, ack.signed)
    assert (doc["rejected"], doc["accepted_claim_fen"]) == (1, 0)
    stored = world[HOME].home_store.db.one(
        "SELECT code, attempt, seq FROM in_lines WHERE trip_id = 'm-1'"
    )
    assert stored == ("NOT_SAME_TRIP", 2, 2)  # final: no representment after it
    assert presented(world, "m-1") == first  # still the first presentment's
    again = home.receive(SERVING, *world.batch([line(gated())], seq=3, kind="represent"))
    assert decode_verdicts(next(iter(again.chunks)))[0].code == "NOT_DISPUTED"
    assert position(world[HOME].home_store, SERVING, DAY).payable_fen == 0


@pytest.mark.parametrize(
    ("entitlement", "code", "claim"),
    [(None, "ACCEPTED", 200), (Entitlement.SENIOR_60, "ENTITLEMENT_MISMATCH", 0)],
)
def test_a_representment_changing_only_the_entitlement_and_amounts_is_judged_as_before(
    world: World, home: Receiver, entitlement: Entitlement | None, code: str, claim: int
) -> None:
    home.receive(SERVING, *world.batch([line(gated(entitlement=Entitlement.SENIOR_65))]))
    corrected = [line(gated(entitlement=entitlement))]  # other amounts, fare and claim
    ack = home.receive(SERVING, *world.batch(corrected, seq=2, kind="represent"))
    assert ack_doc(world, ack.signed)["accepted_claim_fen"] == claim
    stored = world[HOME].home_store.db.one("SELECT code, attempt FROM in_lines")
    assert stored == (code, 2)


def test_a_line_received_by_the_previous_release_has_no_digest_and_its_representment_is_judged(
    world: World, home: Receiver
) -> None:
    """The previous release kept no digest: its lines' representments are judged as they were."""
    home.receive(SERVING, *world.batch([line(gated(entitlement=Entitlement.SENIOR_65))]))
    world[HOME].home_store.db.execute("UPDATE in_lines SET digest = NULL, correctable = NULL")
    moved = [line(gated(occurred_at=AT + timedelta(minutes=1)))]
    ack = home.receive(SERVING, *world.batch(moved, seq=2, kind="represent"))
    assert list(ack.chunks) == []  # every line accepted
    assert ack_doc(world, ack.signed)["accepted_claim_fen"] == 200


def test_a_line_stored_before_clearing_migration_6_is_matched_by_its_presentments_row(
    world: World, home: Receiver
) -> None:
    """Lines stored before migration 6 kept their first presentment in in_line_presentments."""
    first = gated(entitlement=Entitlement.SENIOR_65)  # not a senior: ENTITLEMENT_MISMATCH
    home.receive(SERVING, *world.batch([line(first)]))
    db = world[HOME].home_store.db
    row = db.one("SELECT digest, correctable FROM in_lines WHERE trip_id = 'm-1'")
    assert row == (first.presentment_digest(), correctable_values(first))
    db.execute(  # as the release before kept it
        "INSERT INTO in_line_presentments (sender, operator_id, trip_id, digest, correctable) "
        "SELECT sender, operator_id, trip_id, digest, correctable FROM in_lines"
    )
    db.execute("UPDATE in_lines SET digest = NULL, correctable = NULL")
    moved = [line(gated(occurred_at=AT + timedelta(minutes=1)))]  # another time
    ack = home.receive(SERVING, *world.batch(moved, seq=2, kind="represent"))
    [verdict] = decode_verdicts(next(iter(ack.chunks)))
    assert verdict.code == "NOT_SAME_TRIP"
    assert db.one("SELECT digest FROM in_lines WHERE trip_id = 'm-1'") == (None,)


def test_a_line_without_a_gate_id_as_the_previous_release_sent_it_is_read(
    world: World, home: Receiver
) -> None:
    """No field 14: the bytes the previous release sent, decoded with an empty gate id."""
    t = trip(card(HOME, "plain"), "p-1")
    old = settlement_pb2.BatchLine(
        operator_id=t.operator_id,
        trip_id=t.trip_id,
        card=types_pb2.CardRef(issuer_region=HOME, card_number=t.card.card_number),
        scene=types_pb2.SCENE_BUS,
        gross_fare_fen=200,
        charged_fen=200,
        fare_version="sample-1",
        claimed_fen=200,
    )
    old.occurred_at.FromDatetime(AT)
    chunk = settlement_pb2.BatchLines(lines=[old]).SerializeToString()
    assert decode_lines(chunk) == [line(t)]
    assert encode_lines([line(t)]) == chunk  # and a line without a gate is still sent so
    assert encode_lines([line(replace(t, gate_id="gate-3"))]) != chunk
    spool = world.spool(chunk)
    totals = {"lines": 1, "gross_fen": 200, "charged_fen": 200, "claimed_fen": 200}
    ack = home.receive(SERVING, spool, trailer_for(world, spool, **totals))
    assert ack_doc(world, ack.signed)["accepted_claim_fen"] == 200
    assert presented(world, "p-1") == (None,)  # accepted: never represented, no digest kept


async def test_a_gate_id_travels_from_the_wire_through_the_ledger_and_a_close_to_the_home(
    world: World,
) -> None:
    msg = settlement_pb2.TripRecord(
        operator_id=OPERATOR,
        trip_id="g-1",
        card=types_pb2.CardRef(issuer_region=HOME, card_number=card(HOME, "plain").card_number),
        scene=types_pb2.SCENE_BUS,
        gross_fare_fen=200,
        charged_fen=0,
        concession_fen=200,
        applied_entitlement=types_pb2.ENTITLEMENT_SENIOR_65,  # not a senior: disputed
        fare_version="sample-1",
        gate_id="gate-3",
    )
    msg.occurred_at.FromDatetime(AT)
    sent = trip_from_wire(msg, OPERATOR, 0)
    assert isinstance(sent, Trip) and sent.gate_id == "gate-3"
    world[SERVING].record(sent)
    assert world[SERVING].ledger.accepted_trips(DAY) == [sent]
    sender = world.sender(SERVING)
    await sender.close(DAY)
    assert presented(world, "g-1") == (sent.presentment_digest(),)  # the gate counted
    assert presented(world, "g-1") != (replace(sent, gate_id="").presentment_digest(),)
    full_fare = {"applied_entitlement": None, "charged_fen": 200, "concession_fen": 0}
    result = await sender.represent(HOME, OPERATOR, "g-1", full_fare)
    assert (result.rejected, result.accepted_claim_fen) == (0, 200)  # the same trip, gate and all
