"""A batch checked chunk by chunk (broker.settlement.clearing.received), and verified as it
arrives (Receiver.receive_streamed), on SQLite and PostgreSQL.

The chunks are handed over as the node's verifier would hand them while the stream
comes in; nothing is committed before the signed trailer checks out and names the
batch the sender said it was sending. Every case where it does not is answered by
:meth:`Receiver.receive` over the whole spool afterwards, as before.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.cards.model import SHANGHAI, CardRef, Entitlement, Scene
from broker.core.errors import DocumentRefused
from broker.core.signing import Signer
from broker.settlement.clearing.batch import CHUNK_LINES, Spool, decode_verdicts
from broker.settlement.clearing.received import AckChunks, correctable, presentment_digest
from broker.settlement.clearing.receiver import Ack, Receiver
from broker.settlement.clearing.tail import Hint, StreamEnded
from broker.settlement.trips import Trip, correctable_values
from tests.settlement.clearing.pair import (
    DAY,
    HOME,
    SERVING,
    World,
    backend_url,
    card,
    line,
    trip,
)
from tests.settlement.clearing.test_receiver import (
    MIXED,
    ack_doc,
    count,
    fares_doc,
    nothing_stored,
)

HINT = Hint(DAY, 1, "close")


@pytest.fixture(params=["sqlite", "postgres"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path, ledger_url=backend_url(request))
    yield w
    w.close()


@pytest.fixture
def home(world: World) -> Receiver:
    rx = world.receiver(HOME)
    assert rx.publish_fares(SERVING, fares_doc(world[SERVING].signer)) == ["sample-1"]
    return rx


def streamed(home: Receiver, spool: Spool, trailer: object, hint: Hint = HINT) -> object:
    return home.receive_streamed(
        SERVING,
        hint,
        list(spool.chunks()),
        spool.digest,
        lambda: trailer,  # type: ignore[arg-type, return-value]
    )


def test_a_batch_verified_as_it_arrives_is_stored_and_answered_as_a_whole_one_is(
    world: World, home: Receiver
) -> None:
    spool, trailer = world.batch(MIXED)
    ack = streamed(home, spool, trailer)
    assert ack is not None
    doc = ack_doc(world, ack.signed)  # type: ignore[attr-defined]
    assert (doc["lines"], doc["accepted"], doc["rejected"], doc["cap_exceeded"]) == (5, 2, 3, 0)
    assert (doc["claimed_fen"], doc["accepted_claim_fen"]) == (1000, 400)
    verdicts = [v for c in ack.chunks for v in decode_verdicts(c)]  # type: ignore[attr-defined]
    assert [(v.line_no, v.code) for v in verdicts] == [
        (1, "CARD_NOT_ACTIVE"),
        (3, "WRONG_DISTRICT"),
        (4, "DUPLICATE"),
    ]
    # The same batch sent again, whole: the stored acknowledgement, byte for byte.
    again = home.receive(SERVING, *world.batch(MIXED))
    assert again.signed == ack.signed  # type: ignore[attr-defined]
    assert list(again.chunks) == list(ack.chunks)  # type: ignore[attr-defined]
    assert (count(world, "in_batches"), count(world, "in_lines")) == (1, 3)


def test_a_trailer_whose_signature_fails_after_the_chunks_were_checked_commits_nothing(
    world: World, home: Receiver
) -> None:
    stranger = Signer(ed25519.Ed25519PrivateKey.generate(), "stranger")
    spool, trailer = world.batch(MIXED, signer=stranger)
    with pytest.raises(DocumentRefused):
        streamed(home, spool, trailer)
    assert nothing_stored(world)


def test_totals_that_do_not_add_up_after_the_chunks_were_checked_commit_nothing(
    world: World, home: Receiver
) -> None:
    spool, trailer = world.batch(MIXED, overrides={"claimed_fen": 1})
    with pytest.raises(DocumentRefused, match="totals do not match"):
        streamed(home, spool, trailer)
    assert nothing_stored(world)


def test_a_stream_that_breaks_off_commits_nothing(world: World, home: Receiver) -> None:
    spool, trailer = world.batch(MIXED)
    chunks = list(spool.chunks())

    def broken() -> Iterator[bytes]:
        yield from chunks
        raise StreamEnded("the stream ended without a trailer")

    assert home.receive_streamed(SERVING, HINT, broken(), spool.digest, lambda: trailer) is None
    assert nothing_stored(world)
    # Sent again, whole: verified from the start.
    assert ack_doc(world, home.receive(SERVING, spool, trailer).signed)["accepted"] == 2


@pytest.mark.parametrize(
    "hint", [Hint(DAY, 2, "close"), Hint(DAY, 1, "represent")], ids=["seq", "kind"]
)
def test_a_wrong_word_for_the_batch_commits_nothing_and_leaves_it_to_the_whole_spool(
    world: World, home: Receiver, hint: Hint
) -> None:
    spool, trailer = world.batch(MIXED)
    assert streamed(home, spool, trailer, hint) is None
    assert nothing_stored(world)
    doc = ack_doc(world, home.receive(SERVING, spool, trailer).signed)
    assert (doc["sequence"], doc["accepted"]) == (1, 2)


def test_a_chunk_that_does_not_read_is_left_to_the_whole_spool_to_refuse(
    world: World, home: Receiver
) -> None:
    spool = world.spool(b"\xff\xff garbage")
    _, trailer = world.batch(MIXED)
    assert streamed(home, spool, trailer) is None
    assert nothing_stored(world)


def test_a_batch_received_before_is_answered_from_the_store_not_again(
    world: World, home: Receiver
) -> None:
    first = home.receive(SERVING, *world.batch(MIXED))
    spool, trailer = world.batch(MIXED)
    assert streamed(home, spool, trailer) is None  # the whole spool's answer: the stored one
    assert home.receive(SERVING, spool, trailer).signed == first.signed
    assert count(world, "in_batches") == 1


def test_the_verdicts_are_written_chunk_by_chunk_and_read_back_from_the_store_as_sent(
    world: World, home: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More refused lines than a chunk of verdicts holds: each full chunk is stored as it
    fills, and the acknowledgement's chunks are read from the store a page at a time,
    by whichever connection is given them (a pickled acknowledgement carries none)."""
    lost = card(HOME, "lost")
    refused = [line(trip(lost, f"x-{i}")) for i in range(CHUNK_LINES + 1)]
    spool, trailer = world.batch(refused)
    ack = streamed(home, spool, trailer)
    assert isinstance(ack, Ack)
    doc = ack_doc(world, ack.signed)
    assert doc["verdict_chunks"] == len(ack.chunks) == count(world, "in_ack_chunks") == 2
    monkeypatch.setattr(AckChunks, "PAGE", 1)  # one query per chunk
    chunks = list(ack.chunks)
    assert [len(decode_verdicts(c)) for c in chunks] == [CHUNK_LINES, 1]
    verdicts = [v for c in chunks for v in decode_verdicts(c)]
    assert [v.line_no for v in verdicts] == list(range(CHUNK_LINES + 1))
    assert {v.code for v in verdicts} == {"CARD_NOT_ACTIVE"}
    carried = pickle.loads(pickle.dumps(ack))  # from the verifier's process to the node's
    assert carried == ack
    with pytest.raises(RuntimeError, match="without a database"):
        list(carried.chunks)
    assert list(carried.bound(world[HOME].home_store.db).chunks) == chunks


texts = st.text(max_size=10)
trips = st.builds(
    Trip,
    operator_id=texts,
    trip_id=texts,
    card=st.builds(CardRef, texts, texts),
    scene=st.sampled_from(list(Scene)),
    place_id=texts,
    occurred_at=st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.sampled_from([UTC, timezone(timedelta(hours=8)), SHANGHAI]),
    ),
    gross_fare_fen=st.integers(0, 10**6),
    charged_fen=st.integers(0, 10**6),
    concession_fen=st.integers(0, 10**6),
    applied_entitlement=st.one_of(st.none(), st.sampled_from(list(Entitlement))),
    fare_version=texts,
    gate_id=texts,
)


@settings(max_examples=300, deadline=None)
@given(t=trips)
def test_a_first_presentment_is_kept_with_the_trips_own_digest_and_values(t: Trip) -> None:
    assert presentment_digest(t) == t.presentment_digest()
    assert correctable(t) == correctable_values(t)


def test_a_big_batch_on_postgresql_is_checked_against_analyzed_lines(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The duplicate lookups of each chunk (ids of one operator) are planned by ``in_lines``'
    statistics, gathered inside the batch's own transaction once it has written enough
    lines (broker.core.planner): without them PostgreSQL read every stored line of the
    operator for each chunk, and a million-line batch slowed as it went."""
    import psycopg

    url = str(request.getfixturevalue("postgres_url"))
    world = World(tmp_path, ledger_url=url)
    try:
        home = world.receiver(HOME)
        home.publish_fares(SERVING, fares_doc(world[SERVING].signer))
        plain = card(HOME, "plain")
        lines = [line(trip(plain, f"big-{i:06d}")) for i in range(12_000)]
        ack = home.receive(SERVING, *world.batch(lines))
        assert ack.signed.document  # answered: every line checked and stored
        schema = home._db.schema()
        with psycopg.connect(url, autocommit=True) as conn:
            (planned,) = conn.execute(
                "SELECT reltuples FROM pg_class WHERE oid = to_regclass(%s)",
                (f"{schema}.in_lines",),
            ).fetchone() or (None,)
        assert planned is not None and planned >= 10_000  # analyzed within the batch
    finally:
        world.close()
