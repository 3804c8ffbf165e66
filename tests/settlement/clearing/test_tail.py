"""The spool read while it grows (broker.settlement.clearing.tail).

The node's side (a real :class:`Spool`, a real :class:`EndPipe`) and the verifier's
(:class:`Tail`) run in this process here, each through its own descriptors: the tail
opens the spool and the pipe by their /proc/self/fd paths, as the worker process opens
the node's.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, date, datetime

import pytest

from broker.core.signing import Signed
from broker.settlement.clearing.batch import Spool
from broker.settlement.clearing.tail import HINT_KEY, End, EndPipe, Hint, StreamEnded, Tail

END = End(Signed(b'{"type":"batch"}', "k1", b"\x01" * 64), (("k1", "PEM"),), datetime.now(UTC))


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_the_senders_word_travels_in_the_metadata_and_a_bad_one_is_none() -> None:
    hint = Hint(date(2026, 3, 10), 2, "represent")
    assert Hint.from_metadata(hint.metadata()) == hint
    assert Hint.from_metadata([("other", "x"), *hint.metadata()]) == hint
    for bad in ("2026-03-10/2", "2026-03-10/x/close", "2026-13-10/1/close", "2026-03-10/1/open"):
        assert Hint.from_metadata([(HINT_KEY, bad)]) is None
    assert Hint.from_metadata([(HINT_KEY, "2026-03-10/0/close")]) is None
    assert Hint.from_metadata(None) is None


def test_the_end_message_reads_back_only_whole() -> None:
    data = END.encode()
    assert End.decode(data) == END
    assert End.decode(data[:-1]) is None
    assert End.decode(b"") is None


def test_chunks_are_read_as_they_are_spooled_then_the_trailer() -> None:
    spool, pipe = Spool(), EndPipe()
    before = open_fds()
    tail = Tail(f"/proc/self/fd/{spool.file.fileno()}", pipe.path, stall_s=5)
    chunks = [bytes([i]) * (1000 * i + 1) for i in range(5)]

    def node() -> None:
        for c in chunks:
            spool.add(c)
            time.sleep(0.03)
        pipe.end(END)

    writer = threading.Thread(target=node)
    writer.start()
    try:
        got = list(tail.chunks())
        assert got == chunks
        assert tail.end() == END
        assert tail.digest.hexdigest() == spool.digest.hexdigest()
        assert tail.digest.chunks == 5
    finally:
        writer.join()
        tail.close()
        pipe.close()
        spool.close()
    assert open_fds() <= before  # every descriptor of it is closed


def test_a_stream_ended_without_its_trailer_ends_the_reading() -> None:
    spool, pipe = Spool(), EndPipe()
    tail = Tail(f"/proc/self/fd/{spool.file.fileno()}", pipe.path, stall_s=5)
    try:
        spool.add(b"one")
        chunks = tail.chunks()
        assert next(chunks) == b"one"
        pipe.end(None)  # cancelled, or refused
        with pytest.raises(StreamEnded, match="without a trailer"):
            next(chunks)
        assert tail.end() is None
    finally:
        tail.close()
        pipe.close()
        spool.close()


def test_a_stream_that_stalls_ends_the_reading() -> None:
    spool, pipe = Spool(), EndPipe()
    tail = Tail(f"/proc/self/fd/{spool.file.fileno()}", pipe.path, stall_s=0.1)
    try:
        spool.add(b"one")
        chunks = tail.chunks()
        assert next(chunks) == b"one"
        with pytest.raises(StreamEnded, match="no chunk came"):
            next(chunks)
    finally:
        tail.close()
        pipe.close()
        spool.close()


def test_a_chunk_written_in_part_is_read_only_once_whole() -> None:
    spool, pipe = Spool(), EndPipe()
    tail = Tail(f"/proc/self/fd/{spool.file.fileno()}", pipe.path, stall_s=5)
    try:
        spool.file.write((10).to_bytes(8, "big") + b"12345")
        spool.file.flush()
        assert tail._next() is None
        spool.file.write(b"67890")
        spool.file.flush()
        assert tail._next() == b"1234567890"
    finally:
        tail.close()
        pipe.close()
        spool.close()
