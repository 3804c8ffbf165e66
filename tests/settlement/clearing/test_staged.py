"""A close committed in parts while it is verified (broker.settlement.clearing.staged), on
SQLite; PostgreSQL keeps one transaction per batch.

Parts are made small here (one line each, a chunk of one line at a time); what is
committed meanwhile is read through a connection of its own, as any other process
would: lines, yes, but no acknowledgement before the trailer checks out, and no
line left once the batch is not acknowledged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from broker.core.db import Db
from broker.core.errors import DocumentRefused
from broker.core.signing import Purpose, Signed, Signer
from broker.settlement.clearing import staged
from broker.settlement.clearing.batch import Line, Spool, Totals, decode_verdicts, encode_lines
from broker.settlement.clearing.receiver import Receiver
from broker.settlement.clearing.store import ClearingStore
from broker.settlement.clearing.tail import Hint, StreamEnded
from tests.settlement.clearing.pair import DAY, HOME, NOW, SERVING, World, backend_url
from tests.settlement.clearing.test_receiver import MIXED, ack_doc, fares_doc

HINT = Hint(DAY, 1, "close")
TABLES = ("in_batches", "in_lines", "in_line_presentments", "cap_usage", "in_pending")


@pytest.fixture(params=["sqlite", "postgres"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path, ledger_url=backend_url(request))
    yield w
    w.close()


@pytest.fixture
def home(world: World, monkeypatch: pytest.MonkeyPatch) -> Receiver:
    monkeypatch.setattr(staged, "PART_LINES", 1)
    rx = world.receiver(HOME)
    assert rx.publish_fares(SERVING, fares_doc(world[SERVING].signer)) == ["sample-1"]
    return rx


@pytest.fixture
def other(world: World) -> Iterator[Db]:
    """Another connection to the home's clearing tables: sees only what is committed."""
    db = ClearingStore.reader(world[HOME].cfg)
    yield db
    db.close()


def counts(db: Db) -> dict[str, int]:
    found = {t: int((db.one(f"SELECT count(*) FROM {t}") or (0,))[0]) for t in TABLES}
    digests = db.one("SELECT count(*) FROM in_lines WHERE digest IS NOT NULL")
    found["presented"] = int(digests[0]) if digests else 0  # first presentments, in in_lines
    return found


def single_lines(
    world: World, lines: list[Line], signer: Signer | None = None
) -> tuple[Spool, Signed]:
    """A close of ``lines``, one line a chunk, and its signed trailer."""
    spool = world.spool(*(encode_lines([x]) for x in lines))
    totals = Totals()
    for x in lines:
        totals.add(x)
    header = {
        "type": "batch",
        "from": SERVING,
        "to": HOME,
        "period": DAY.isoformat(),
        "sequence": 1,
        "kind": "close",
        "created_at": NOW.isoformat(),
        **totals.as_doc(),
        "digest": spool.digest.hexdigest(),
        "chunks": spool.digest.chunks,
    }
    return spool, (signer or world[SERVING].signer).sign(header, Purpose.BATCH)


def watched(
    spool: Spool, seen: list[dict[str, int]], db: Db, then: Callable[[], None]
) -> Iterator[bytes]:
    """The spool's chunks; before each one after the first, what ``db`` sees committed."""
    for i, chunk in enumerate(spool.chunks()):
        if i:
            seen.append(counts(db))
        yield chunk
    then()


def test_a_close_is_committed_in_parts_yet_nothing_is_acknowledged_before_its_trailer(
    world: World, home: Receiver, other: Db
) -> None:
    spool, trailer = single_lines(world, MIXED)
    seen: list[dict[str, int]] = []
    ack = home.receive_streamed(
        SERVING, HINT, watched(spool, seen, other, lambda: None), spool.digest, lambda: trailer
    )
    assert ack is not None
    doc = ack_doc(world, ack.signed)
    assert (doc["lines"], doc["accepted"], doc["rejected"]) == (5, 2, 3)  # as in one piece
    assert all(s["in_batches"] == 0 for s in seen)  # no acknowledgement before the trailer
    stored_meanwhile = [s["in_lines"] for s in seen]
    if world[HOME].cfg.ledger.url:  # PostgreSQL: one transaction, nothing seen before it
        assert stored_meanwhile == [0, 0, 0, 0]
    else:
        assert stored_meanwhile == [1, 2, 3, 3]  # lines 3 and 4 are not stored
        assert all(s["in_pending"] == 1 for s in seen)
    assert counts(other) == {
        "in_batches": 1,
        "in_lines": 3,
        "in_line_presentments": 0,  # lines stored before clearing migration 6 only
        "presented": 1,  # x-1, rejected: the only line of them that may be represented
        "cap_usage": 1,  # the senior's concession
        "in_pending": 0,
    }


def test_a_stream_that_breaks_off_after_parts_were_committed_leaves_nothing(
    world: World, home: Receiver, other: Db
) -> None:
    spool, trailer = single_lines(world, MIXED)
    seen: list[dict[str, int]] = []

    def broken() -> None:
        raise StreamEnded("the stream ended without a trailer")

    chunks = watched(spool, seen, other, broken)
    assert home.receive_streamed(SERVING, HINT, chunks, spool.digest, lambda: trailer) is None
    assert not world[HOME].cfg.ledger.url or seen[-1]["in_lines"] == 0
    assert world[HOME].cfg.ledger.url or seen[-1]["in_lines"] == 3  # committed, then unmade
    assert set(counts(other).values()) == {0}
    # Sent again, whole: verified from the start (no line of it is a duplicate of itself).
    doc = ack_doc(world, home.receive(SERVING, spool, trailer).signed)
    assert (doc["accepted"], doc["rejected"]) == (2, 3)


def test_a_trailer_that_fails_after_parts_were_committed_leaves_nothing(
    world: World, home: Receiver, other: Db
) -> None:
    stranger = Signer(ed25519.Ed25519PrivateKey.generate(), "stranger")
    spool, trailer = single_lines(world, MIXED, stranger)
    with pytest.raises(DocumentRefused):
        home.receive_streamed(SERVING, HINT, spool.chunks(), spool.digest, lambda: trailer)
    assert set(counts(other).values()) == {0}


@pytest.mark.parametrize("world", ["sqlite"], indirect=True)  # PostgreSQL: one transaction
def test_the_parts_of_a_verifier_that_died_are_unmade_by_the_next_verification(
    world: World, home: Receiver, other: Db, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool, trailer = single_lines(world, MIXED)

    def died() -> None:
        raise StreamEnded("killed")

    with monkeypatch.context() as m:
        m.setattr(staged, "unmake", lambda db: 0)  # the process died: nothing cleaned up
        chunks = watched(spool, [], other, died)
        assert home.receive_streamed(SERVING, HINT, chunks, spool.digest, lambda: trailer) is None
    left = counts(other)
    assert (left["in_pending"], left["in_lines"], left["in_batches"]) == (1, 3, 0)
    doc = ack_doc(world, home.receive(SERVING, spool, trailer).signed)
    assert (doc["accepted"], doc["rejected"]) == (2, 3)  # not duplicates of what was left
    assert counts(other)["in_lines"] == 3 and counts(other)["in_pending"] == 0


@pytest.mark.parametrize("world", ["sqlite"], indirect=True)
def test_unmake_removes_exactly_the_pending_batchs_lines(world: World, home: Receiver) -> None:
    kept = home.receive(SERVING, *world.batch(MIXED[:1], seq=2))  # another batch, acknowledged
    assert kept is not None
    db = world[HOME].home_store.db
    with db.write():
        staged.mark(db, SERVING, DAY.isoformat(), 1, "x")
        db.execute(
            "INSERT INTO in_lines (sender, operator_id, trip_id, period, seq, attempt, code, "
            "claimed_fen, accepted_claim_fen) VALUES (?, 'op', 'gone', ?, 1, 1, 'ACCEPTED', 1, 1)",
            (SERVING, DAY.isoformat()),
        )
        db.execute(
            "INSERT INTO in_line_presentments (sender, operator_id, trip_id, digest) "
            "VALUES (?, 'op', 'gone', 'd')",
            (SERVING,),
        )
        db.execute(
            "INSERT INTO cap_usage (source, holder_key, scheme, month, year, occurred_at) "
            "VALUES (?, 'h', 's', 'm', 'y', 'o')",
            (f"{SERVING}|op|gone",),
        )
    before = counts(db)
    with db.write():
        assert staged.unmake(db) == 1
    after = counts(db)
    assert {t: before[t] - after[t] for t in TABLES} == {
        "in_batches": 0,
        "in_lines": 1,
        "in_line_presentments": 1,
        "cap_usage": 1,
        "in_pending": 1,
    }
    with db.write():
        assert staged.unmake(db) == 0


@pytest.mark.parametrize("world", ["sqlite"], indirect=True)
def test_a_representment_after_a_verifier_died_sees_none_of_the_unacknowledged_parts(
    world: World, home: Receiver, other: Db, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool, trailer = single_lines(world, MIXED)

    def died() -> None:
        raise StreamEnded("killed")

    with monkeypatch.context() as m:
        m.setattr(staged, "unmake", lambda db: 0)  # the process died: nothing cleaned up
        chunks = watched(spool, [], other, died)
        assert home.receive_streamed(SERVING, HINT, chunks, spool.digest, lambda: trailer) is None
    assert counts(other)["in_lines"] == 3  # x-1 among them, refused CARD_NOT_ACTIVE
    # x-1 represented: its first presentment was never acknowledged, so there is none.
    again = world.batch([MIXED[1]], seq=2, kind="represent")
    ack = home.receive(SERVING, *again)
    assert ack_doc(world, ack.signed)["rejected"] == 1
    [verdict] = decode_verdicts(next(iter(ack.chunks)))
    assert verdict.code == "NOT_DISPUTED"
    assert counts(other)["in_pending"] == 0
