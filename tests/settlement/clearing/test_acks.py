"""Storing a home district's acknowledgement (broker.settlement.clearing.acks.store_ack).

On a real ClearingStore (SQLite and PostgreSQL): the built batch becomes acked
with the signed ack, each verdict is kept once, a close's refused lines open
disputes (not lines only cut by a cap), a representment's verdict settles the
dispute it carried. All in one transaction.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from broker.core.db import Db
from broker.core.errors import DocumentRefused
from broker.core.signing import Signed
from broker.settlement.clearing.acks import store_ack
from broker.settlement.clearing.batch import Spool, Totals, Verdict, encode_verdicts
from broker.settlement.clearing.store import ClearingStore, unb64
from broker.settlement.clearing.verify import CAP_EXCEEDED
from tests.settlement.clearing.test_store import node_config

HOME, DAY, OTHER_DAY = "512021", "2026-11-28", "2026-11-29"
T0, T1 = "2026-11-28T18:00:00.000000+00:00", "2026-11-28T19:00:00.000000+00:00"
ACK = Signed(b'{"type":"ack","sequence":1}', "0123456789abcdef", bytes(range(64)))


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ClearingStore]:
    """One ClearingStore per database for the module (opening one costs more than a test)."""
    base = tmp_path_factory.mktemp("acks")
    url: str | None = None
    schema = f"yk_test_{secrets.token_hex(4)}"
    if request.param == "sqlite":
        cfg = node_config(base, {"path": "ledger.sqlite3"})
    else:
        url = request.getfixturevalue("postgres_url")
        cfg = node_config(base, {"url": url, "schema": schema})
    opened = ClearingStore.open(cfg)
    yield opened
    opened.close()
    if url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture
def db(store: ClearingStore) -> Db:
    """The store's clearing tables, emptied of what an earlier test left."""
    with store.db.write():
        for table in ("out_batches", "out_verdicts", "disputes"):
            store.db.execute(f"DELETE FROM {table}")
    return store.db


def built(db: Db, seq: int, kind: str = "close", day: str = DAY) -> None:
    with db.write():
        db.execute(
            "INSERT INTO out_batches (counterparty, period, seq, kind, lo, hi, state, created_at) "
            "VALUES (?, ?, ?, ?, 0, 10, 'built', ?)",
            (HOME, day, seq, kind, T0),
        )


def represented(db: Db, trip_id: str, seq: int, day: str = DAY) -> None:
    """A dispute on ``trip_id`` whose corrected line went out in batch ``seq``."""
    with db.write():
        db.execute(
            "INSERT INTO disputes (counterparty, period, operator_id, trip_id, code, state, "
            "represent_seq, updated_at) VALUES (?, ?, 'bus-01', ?, 'PRICE_MISMATCH', "
            "'represented', ?, ?)",
            (HOME, day, trip_id, seq, T0),
        )


def spool(*chunks: list[Verdict]) -> Spool:
    s = Spool()
    for block in chunks:
        s.add(encode_verdicts(block))
    return s


def verdict(
    line_no: int, trip_id: str, code: str, claimed: int = 150, accepted: int = 0
) -> Verdict:
    return Verdict(line_no, "bus-01", trip_id, code, accepted, claimed)


def totals(lines: int, claimed: int) -> Totals:
    return Totals(lines=lines, claimed_fen=claimed)


def ack(
    db: Db,
    seq: int,
    kind: str,
    verdicts: Spool,
    accepted: int,
    *,
    signed: Signed = ACK,
    now: str = T1,
    day: str = DAY,
    lines: int = 3,
    claimed: int = 450,
) -> None:
    try:
        store_ack(
            db,
            now,
            HOME,
            day,
            seq,
            kind,
            totals(lines, claimed),
            "d" * 64,
            signed,
            accepted,
            verdicts,
        )
    finally:
        verdicts.close()


def batch_row(db: Db, seq: int, day: str = DAY) -> dict[str, Any]:
    cols = (
        "state, digest, lines, claimed_fen, ack, ack_key_id, ack_signature, "
        "accepted_claim_fen, acked_at"
    )
    row = db.one(
        f"SELECT {cols} FROM out_batches WHERE counterparty = ? AND period = ? AND seq = ?",
        (HOME, day, seq),
    )
    assert row is not None
    return dict(zip([c.strip() for c in cols.split(",")], row, strict=True))


def disputes(db: Db) -> dict[str, tuple[Any, ...]]:
    """trip_id -> (period, code, state, final_code, accepted_claim_fen)."""
    rows = db.all(
        "SELECT trip_id, period, code, state, final_code, accepted_claim_fen FROM disputes"
    )
    return {str(r[0]): tuple(r[1:]) for r in rows}


def verdict_rows(db: Db) -> list[tuple[Any, ...]]:
    return db.all(
        "SELECT seq, line_no, trip_id, code, claimed_fen, accepted_claim_fen FROM out_verdicts "
        "ORDER BY seq, line_no"
    )


# ---------------------------------------------------------------- the batch


def test_the_built_batch_becomes_acked_with_the_signed_ack(db: Db):
    built(db, 1)
    ack(db, 1, "close", spool(), 450)
    row = batch_row(db, 1)
    assert row["state"] == "acked"
    assert (row["digest"], row["lines"], row["claimed_fen"]) == ("d" * 64, 3, 450)
    assert row["accepted_claim_fen"] == 450 and row["acked_at"] == T1
    stored = Signed(str(row["ack"]).encode(), row["ack_key_id"], unb64(row["ack_signature"]))
    assert stored == ACK  # the ack can be verified again later, byte for byte


def test_an_already_acked_batch_keeps_its_first_ack(db: Db):
    built(db, 1)
    ack(db, 1, "close", spool(), 450)
    other = Signed(b'{"type":"ack","sequence":1,"other":1}', "fedcba9876543210", b"\x01" * 64)
    ack(db, 1, "close", spool(), 0, signed=other, now="later")
    row = batch_row(db, 1)
    assert (row["ack_key_id"], row["accepted_claim_fen"], row["acked_at"]) == (
        ACK.key_id,
        450,
        T1,
    )


def test_only_the_named_batch_is_acked(db: Db):
    built(db, 1)
    built(db, 2)
    built(db, 1, day=OTHER_DAY)
    ack(db, 1, "close", spool(), 450)
    assert batch_row(db, 1)["state"] == "acked"
    assert batch_row(db, 2)["state"] == "built"
    assert batch_row(db, 1, OTHER_DAY)["state"] == "built"


# ---------------------------------------------------------------- verdicts


def test_every_verdict_of_every_chunk_is_stored_once(db: Db):
    built(db, 1)
    first = [verdict(0, "t-0", "UNKNOWN_CARD"), verdict(1, "t-1", CAP_EXCEEDED, accepted=50)]
    second = [verdict(2, "t-2", "PRICE_MISMATCH")]
    ack(db, 1, "close", spool(first, second), 50)
    expected = [
        (1, 0, "t-0", "UNKNOWN_CARD", 150, 0),
        (1, 1, "t-1", CAP_EXCEEDED, 150, 50),
        (1, 2, "t-2", "PRICE_MISMATCH", 150, 0),
    ]
    assert verdict_rows(db) == expected
    ack(db, 1, "close", spool(first, second), 50)  # the same ack stored again
    assert verdict_rows(db) == expected  # no duplicates


def test_an_ack_without_verdicts_stores_none_and_opens_no_dispute(db: Db):
    built(db, 1)
    ack(db, 1, "close", spool([]), 450)  # an empty chunk of verdicts, too
    assert verdict_rows(db) == [] and disputes(db) == {}


# ---------------------------------------------------------------- disputes from a close


def test_a_closes_refused_lines_open_disputes_but_not_a_cap_cut(db: Db):
    built(db, 1)
    verdicts = [
        verdict(0, "t-0", "UNKNOWN_CARD"),
        verdict(1, "t-1", CAP_EXCEEDED, accepted=50),
        verdict(2, "t-2", "PRICE_MISMATCH"),
    ]
    ack(db, 1, "close", spool(verdicts), 50)
    assert disputes(db) == {
        "t-0": (DAY, "UNKNOWN_CARD", "open", None, None),
        "t-2": (DAY, "PRICE_MISMATCH", "open", None, None),
    }


def test_a_dispute_is_opened_once_and_an_existing_one_is_untouched(db: Db):
    represented(db, "t-0", seq=7)
    built(db, 1)
    ack(db, 1, "close", spool([verdict(0, "t-0", "UNKNOWN_CARD")]), 300)
    built(db, 2)
    ack(db, 2, "close", spool([verdict(0, "t-5", "UNKNOWN_CARD")]), 300)
    ack(db, 2, "close", spool([verdict(0, "t-5", "UNKNOWN_CARD")]), 300)
    assert disputes(db) == {
        "t-0": (DAY, "PRICE_MISMATCH", "represented", None, None),  # as it was
        "t-5": (DAY, "UNKNOWN_CARD", "open", None, None),
    }


# ---------------------------------------------------------------- a representment's verdict


def test_a_representment_without_a_verdict_settles_its_dispute_as_accepted(db: Db):
    represented(db, "t-0", seq=2)
    built(db, 2, kind="represent")
    ack(db, 2, "represent", spool(), 140, lines=1, claimed=140)
    assert disputes(db) == {"t-0": (DAY, "PRICE_MISMATCH", "accepted", None, 140)}
    assert batch_row(db, 2)["state"] == "acked"


def test_a_representment_refused_again_is_final_with_the_new_code(db: Db):
    represented(db, "t-0", seq=2)
    built(db, 2, kind="represent")
    ack(db, 2, "represent", spool([verdict(0, "t-0", "CARD_NOT_ACTIVE")]), 0, lines=1)
    assert disputes(db) == {"t-0": (DAY, "PRICE_MISMATCH", "final", "CARD_NOT_ACTIVE", 0)}


def test_a_representment_only_cut_by_a_cap_is_accepted_at_the_acked_amount(db: Db):
    represented(db, "t-0", seq=2)
    built(db, 2, kind="represent")
    capped = verdict(0, "t-0", CAP_EXCEEDED, claimed=150, accepted=50)
    ack(db, 2, "represent", spool([capped]), 50, lines=1, claimed=150)
    assert disputes(db) == {"t-0": (DAY, "PRICE_MISMATCH", "accepted", None, 50)}


def test_a_representments_verdict_opens_no_new_dispute_and_settles_only_its_own(db: Db):
    represented(db, "t-0", seq=2)
    represented(db, "t-1", seq=3)
    built(db, 2, kind="represent")
    ack(db, 2, "represent", spool([verdict(0, "t-9", "UNKNOWN_CARD")]), 140, lines=1)
    got = disputes(db)
    assert set(got) == {"t-0", "t-1"}  # t-9 opened nothing: it was no close
    assert got["t-0"][2] == "accepted"
    assert got["t-1"][2] == "represented"  # its own batch (seq 3) is not acked yet


def test_a_representments_ack_leaves_another_days_representment_alone(db: Db):
    """Sequences restart each day: an ack of day A's representment 2 leaves day B's alone."""
    represented(db, "t-0", seq=2, day=DAY)
    represented(db, "t-7", seq=2, day=OTHER_DAY)  # seq numbers restart each day
    built(db, 2, kind="represent", day=DAY)
    built(db, 2, kind="represent", day=OTHER_DAY)
    ack(db, 2, "represent", spool(), 140, lines=1, day=DAY)
    assert disputes(db)["t-7"][2] == "represented"


# ---------------------------------------------------------------- one transaction


def test_garbage_in_the_verdicts_stores_nothing_of_the_ack(db: Db):
    built(db, 1)
    bad = Spool()
    bad.add(encode_verdicts([verdict(0, "t-0", "UNKNOWN_CARD")]))
    bad.add(b"\xff\xff\xff")  # a second chunk that does not parse
    with pytest.raises(DocumentRefused):
        ack(db, 1, "close", bad, 300)
    assert batch_row(db, 1)["state"] == "built"  # rolled back whole
    assert verdict_rows(db) == [] and disputes(db) == {}
    ack(db, 1, "close", spool([verdict(0, "t-0", "UNKNOWN_CARD")]), 300)  # and usable after
    assert batch_row(db, 1)["state"] == "acked" and len(verdict_rows(db)) == 1
