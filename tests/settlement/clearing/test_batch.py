"""Batch framing (broker.settlement.clearing.batch): lines, chunks, the digest, Spool, Totals.

A received chunk is untrusted bytes: anything that does not decode to known
lines refuses the batch (DocumentRefused), never another exception.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from broker._proto.yikatong.v1 import settlement_pb2
from broker.cards.model import CardRef, DecisionSource, Entitlement, Scene
from broker.core.errors import DocumentRefused, LimitExceeded
from broker.settlement.clearing.batch import (
    CHUNK_LINES,
    Digest,
    Line,
    Spool,
    Totals,
    Verdict,
    chunked,
    count_lines,
    decode_lines,
    decode_verdicts,
    encode_lines,
    encode_verdicts,
    verdict_rows,
)
from broker.settlement.trips import Trip

NOW = datetime(2026, 11, 28, 8, 0, 0, 123456, tzinfo=UTC)


def line(n: int = 1, claimed: int = 150, **changes: object) -> Line:
    base = Trip(
        "bus-01",
        f"t-{n:06d}",
        CardRef("512021", "C5120210000001"),
        Scene.BUS,
        "route-3",
        NOW - timedelta(minutes=n),
        200,
        50,
        150,
        Entitlement.SENIOR_65,
        "sample-1",
    )
    return Line(replace(base, **changes), "senior-bus-free", claimed)  # type: ignore[arg-type]


def digest_of(chunks: list[bytes]) -> str:
    d = Digest()
    for c in chunks:
        d.update(c)
    return d.hexdigest()


# ---------------------------------------------------------------- lines


def test_lines_round_trip_with_every_field():
    lines = [
        line(1),
        line(2, applied_entitlement=None, scene=Scene.LIBRARY, place_id=""),
        line(3, claimed=0, place_id="大足石刻", fare_version="v-2026"),
        line(4, occurred_at=datetime(2026, 11, 27, 15, 59, 59, 999999, tzinfo=UTC)),
    ]
    back = decode_lines(encode_lines(lines))
    assert back == lines
    assert back[1].trip.applied_entitlement is None
    assert all(x.trip.occurred_at.tzinfo is not None for x in back)


def test_encoding_is_deterministic():
    lines = [line(n) for n in range(5)]
    assert encode_lines(lines) == encode_lines(list(lines))


def test_an_empty_chunk_holds_no_lines():
    assert encode_lines([]) == b""
    assert decode_lines(b"") == []


# ---------------------------------------------------------------- chunks


@pytest.mark.parametrize(("count", "size"), [(0, 3), (1, 3), (3, 3), (7, 3), (9, 3), (5, 1)])
def test_chunks_never_exceed_the_limit_and_keep_every_line_in_order(count, size):
    lines = [line(n) for n in range(count)]
    chunks = list(chunked(lines, size))
    assert all(1 <= n <= size for _, n in chunks)  # no empty trailing chunk either
    assert [n for _, n in chunks] == [len(decode_lines(c)) for c, _ in chunks]
    assert [x for c, _ in chunks for x in decode_lines(c)] == lines
    assert len(chunks) == -(-count // size)


def test_the_default_chunk_is_chunk_lines_and_the_receiver_accepts_it():
    lines = [line(n) for n in range(CHUNK_LINES + 1)]
    chunks = list(chunked(iter(lines)))  # any iterable: a generator from the ledger
    assert [n for _, n in chunks] == [CHUNK_LINES, 1]
    assert len(decode_lines(chunks[0][0])) == CHUNK_LINES


def test_a_chunk_over_the_limit_is_refused():
    oversized = encode_lines([line(n) for n in range(CHUNK_LINES + 1)])
    with pytest.raises(DocumentRefused, match=f"more than {CHUNK_LINES}"):
        decode_lines(oversized)


# ---------------------------------------------------------------- the digest


def test_the_digest_changes_with_any_byte_of_any_chunk():
    chunks = [c for c, _ in chunked([line(n) for n in range(4)], 2)]
    base = digest_of(chunks)
    assert digest_of(list(chunks)) == base  # the same chunks, the same digest
    for i, chunk in enumerate(chunks):
        for j in range(len(chunk)):
            changed = bytearray(chunk)
            changed[j] ^= 0x01
            assert digest_of([*chunks[:i], bytes(changed), *chunks[i + 1 :]]) != base, (i, j)


def test_the_digest_covers_chunk_boundaries_order_and_count():
    assert digest_of([b"ab", b"c"]) != digest_of([b"a", b"bc"])  # length-prefixed
    assert digest_of([b"a", b"b"]) != digest_of([b"b", b"a"])
    assert digest_of([b"a"]) != digest_of([b"a", b""])  # an empty chunk still counts
    d = Digest()
    for c in (b"a", b"", b"b"):
        d.update(c)
    assert d.chunks == 3


def test_an_empty_digest_is_that_of_no_chunks():
    import hashlib

    assert Digest().hexdigest() == hashlib.sha256().hexdigest()
    assert Digest().chunks == 0


# ---------------------------------------------------------------- Spool


def test_a_spool_gives_back_its_chunks_in_order_and_their_digest():
    chunks = [b"first", b"", bytes(range(256)), b"last"]
    spool = Spool()
    for c in chunks:
        spool.add(c)
    assert list(spool.chunks()) == chunks
    assert list(spool.chunks()) == chunks  # read again from the start
    assert spool.digest.hexdigest() == digest_of(chunks)
    assert spool.digest.chunks == len(chunks)
    spool.close()
    assert spool.file.closed


def test_an_empty_spool_has_no_chunks():
    spool = Spool()
    assert list(spool.chunks()) == []
    spool.close()


def test_a_spool_keeps_chunks_on_disk_not_in_memory():
    spool = Spool()
    spool.add(b"x" * 100_000)
    assert spool.file.tell() == 8 + 100_000  # written through, length-prefixed
    spool.close()


# ---------------------------------------------------------------- Totals


def test_totals_add_up_every_line():
    totals = Totals()
    for x in (line(1), line(2, claimed=0, gross_fare_fen=300, charged_fen=300, concession_fen=0)):
        totals.add(x)
    assert totals.as_doc() == {
        "lines": 2,
        "gross_fen": 500,
        "charged_fen": 350,
        "concession_fen": 150,
        "claimed_fen": 150,
    }


def test_empty_totals_are_zero():
    assert Totals().as_doc() == dict.fromkeys(
        ("lines", "gross_fen", "charged_fen", "concession_fen", "claimed_fen"), 0
    )


# ---------------------------------------------------------------- verdicts


def test_verdicts_round_trip():
    verdicts = [
        Verdict(0, "bus-01", "t-1", "PRICE_MISMATCH", 0, 150),
        Verdict(2_000_000, "museum-01", "t-2", "CAP_EXCEEDED", 50, 150),
    ]
    assert decode_verdicts(encode_verdicts(verdicts)) == verdicts
    assert decode_verdicts(encode_verdicts([])) == []


def test_verdict_rows_are_each_verdicts_fields_in_order():
    verdicts = [
        Verdict(0, "bus-01", "t-1", "PRICE_MISMATCH", 0, 150),
        Verdict(7, "museum-01", "t-2", "CAP_EXCEEDED", 50, 150),
    ]
    assert verdict_rows(encode_verdicts(verdicts)) == [
        (0, "bus-01", "t-1", "PRICE_MISMATCH", 0, 150),
        (7, "museum-01", "t-2", "CAP_EXCEEDED", 50, 150),
    ]


# ---------------------------------------------------------------- garbage


GARBAGE = [b"\xff\xff\xff", b"garbage", b"\x0a\xff", b"\x0a\x05abc", bytes(range(256))]


@pytest.mark.parametrize("chunk", GARBAGE)
def test_garbage_bytes_in_a_chunk_of_lines_are_refused(chunk):
    with pytest.raises(DocumentRefused, match="does not parse"):
        decode_lines(chunk)


@pytest.mark.parametrize("chunk", GARBAGE)
def test_garbage_bytes_in_a_chunk_of_verdicts_are_refused(chunk):
    with pytest.raises(DocumentRefused, match="does not parse"):
        decode_verdicts(chunk)
    with pytest.raises(DocumentRefused, match="does not parse"):
        verdict_rows(chunk)


def test_a_truncated_chunk_is_refused():
    chunk = encode_lines([line(1), line(2)])
    with pytest.raises(DocumentRefused):
        decode_lines(chunk[:-3])


def raw_line(**fields: object) -> bytes:
    msg = settlement_pb2.BatchLine(operator_id="bus-01", trip_id="t-1", scene=1)  # type: ignore[arg-type]
    for name, value in fields.items():
        setattr(msg, name, value)
    msg.occurred_at.FromDatetime(NOW)
    return settlement_pb2.BatchLines(lines=[msg]).SerializeToString()


@pytest.mark.parametrize(
    "fields",
    [
        {"scene": 99},
        {"scene": -1},
        {"applied_entitlement": 42},
        {"decision_source": 6},
        {"decision_source": -3},
    ],
    ids=str,
)
def test_a_line_with_an_unknown_scene_entitlement_or_source_is_refused(fields):
    with pytest.raises(DocumentRefused, match="unknown scene, entitlement or decision source"):
        decode_lines(raw_line(**fields))


@pytest.mark.parametrize("source", [None, *DecisionSource])
def test_a_lines_decision_source_goes_out_and_comes_back(source):
    one = line(decision_source=source)
    (back,) = decode_lines(encode_lines([one]))
    assert back.trip.decision_source is source
    assert back == one


def test_a_line_without_a_decision_source_is_the_bytes_the_previous_release_sent():
    """An empty field encodes to nothing: the line's bytes (and so a stored batch digest)
    are what they were before the field was appended; a source adds field 15 at the end."""
    without = encode_lines([line()])
    marked = encode_lines([line(decision_source=DecisionSource.STALE)])
    msg = settlement_pb2.BatchLines.FromString(without)
    assert not msg.lines[0].decision_source
    assert marked[2:] == without[2:] + b"\x78\x04"  # after the changed line length


def test_a_line_with_an_occurred_at_beyond_datetime_is_refused():
    msg = settlement_pb2.BatchLines.FromString(raw_line())
    msg.lines[0].occurred_at.seconds = 253_402_300_800  # year 10000
    with pytest.raises(DocumentRefused):
        decode_lines(msg.SerializeToString())


# ---------------------------------------------------------------- counting and bounding


@pytest.mark.parametrize("n", [0, 1, 127, 2000])
def test_count_lines_counts_from_the_framing_what_decoding_finds(n: int):
    chunk = encode_lines([line(i) for i in range(n)])
    assert count_lines(chunk) == len(decode_lines(chunk)) == n


def test_count_lines_handles_long_lines_and_skips_unknown_fields():
    long = replace(line(1).trip, place_id="p" * 20_000)  # a 3-byte length prefix
    msg = settlement_pb2.BatchLines.FromString(
        encode_lines([Line(long, "senior-bus-free", 1), line(2)])
    )
    unknown = b"\x10\x05" + b"\x1a\x02ab" + b"\x25\x00\x00\x00\x00" + b"\x29" + bytes(8)
    assert count_lines(msg.SerializeToString() + unknown) == 2  # fields 2, 3, 4, 5: not lines


@pytest.mark.parametrize("extra", [0, 1, 20, 100, 16_300, 16_400])
def test_count_lines_reads_one_two_and_three_byte_lengths_alike(extra: int):
    """Lengths around 128 bytes and 16 KiB: where the one- and two-byte fast paths end."""
    chunk = encode_lines(
        [Line(replace(line(i).trip, place_id="p" * (extra + i)), "", 1) for i in range(30)]
    )
    assert count_lines(chunk) == len(decode_lines(chunk)) == 30


@pytest.mark.parametrize(
    "chunk",
    [
        b"\n\x80",
        b"\n\x05abcde\n",
        b"\n\x80\x01" + b"a" * 127,
    ],
    ids=["two-byte-length-cut", "length-cut-after-a-line", "two-byte-body-short"],
)
def test_count_lines_refuses_a_cut_two_byte_length_or_body(chunk: bytes):
    with pytest.raises(DocumentRefused, match="does not parse"):
        count_lines(chunk)


def test_an_unhashed_spool_keeps_no_digest_and_its_reader_works_out_the_same_one():
    chunks = [encode_lines([line(1), line(2)]), encode_lines([line(3)])]
    hashed, bare = Spool(), Spool(max_lines=10, max_bytes=10**6, hashed=False)
    for chunk in chunks:
        hashed.add(chunk)
        bare.add(chunk)
    with pytest.raises(RuntimeError, match="keeps no digest"):
        bare.digest  # noqa: B018 - reading it is the test
    bare.file.flush()
    reread = Spool.reopened(f"/proc/self/fd/{bare.file.fileno()}")
    try:
        assert reread.digest.hexdigest() == hashed.digest.hexdigest()
        assert reread.digest.chunks == hashed.digest.chunks == 2
    finally:
        for s in (reread, bare, hashed):
            s.close()


@pytest.mark.parametrize(
    "chunk",
    [
        b"x",
        b"\n",
        b"\n\x05abc",
        b"\n\xff\xff",
        b"\x0b\x0c",
        encode_lines([line(1)])[:-1] + b"\n\x09",
    ],
    ids=["no-length", "no-size", "short", "open-varint", "group", "overrun"],
)
def test_count_lines_refuses_framing_that_does_not_hold_together(chunk: bytes):
    with pytest.raises(DocumentRefused, match="does not parse"):
        count_lines(chunk)


def test_the_chunk_that_would_pass_the_line_limit_is_refused_and_never_written():
    spool = Spool(max_lines=3, max_bytes=10**9)
    first = encode_lines([line(1), line(2)])
    spool.add(first)
    size = spool.file.tell()
    with pytest.raises(
        LimitExceeded, match=r"more than 3 lines \(the limit settlement\.max_batch_lines\)"
    ):
        spool.add(encode_lines([line(3), line(4)]))
    assert spool.file.tell() == size and spool.digest.chunks == 1 and spool.lines == 2
    spool.add(encode_lines([line(5)]))  # exactly at the limit: taken
    assert spool.lines == 3
    assert [len(c) for c in spool.chunks()] == [len(first), len(encode_lines([line(5)]))]
    spool.close()


def test_the_chunk_that_would_pass_the_byte_limit_is_refused_and_never_written():
    chunk = encode_lines([line(1)])
    spooled = 8 + len(chunk)  # each chunk with its length on disk
    spool = Spool(max_lines=100, max_bytes=2 * spooled)
    try:
        spool.add(chunk)
        spool.add(chunk)
        with pytest.raises(LimitExceeded) as info:
            spool.add(chunk)
        assert info.value.setting == "settlement.max_batch_bytes"
        assert info.value.maximum == 2 * spooled
        assert spool.bytes == 2 * spooled and spool.digest.chunks == 2
    finally:
        spool.close()


def test_a_bounded_spool_refuses_a_chunk_of_more_than_chunk_lines():
    spool = Spool(max_lines=10**6, max_bytes=10**9)
    with pytest.raises(DocumentRefused, match=f"more than {CHUNK_LINES} lines"):
        spool.add(encode_lines([line(i) for i in range(CHUNK_LINES + 1)]))
    spool.close()


def test_an_unbounded_spool_counts_nothing_and_closing_twice_is_harmless():
    """The sender spools verdict chunks this way: not lines, never counted as lines."""
    spool = Spool()
    spool.add(b"\x0a\x00" * (CHUNK_LINES + 1))
    assert spool.lines == 0 and not spool.closed
    spool.close()
    spool.close()
    assert spool.closed


def test_empty_chunks_use_up_the_byte_limit_too() -> None:
    """An empty chunk counts no line: its 8 bytes on disk still count, so a peer cannot
    spool them for ever."""
    spool = Spool(max_lines=3, max_bytes=80)
    try:
        for _ in range(10):
            spool.add(b"")
        with pytest.raises(LimitExceeded, match=r"settlement\.max_batch_bytes"):
            spool.add(b"")
        assert spool.bytes == 80 and spool.digest.chunks == 10
    finally:
        spool.close()
