"""Ledger rows straight to batch chunks (broker.settlement.clearing.rows).

The fast path must give, byte for byte, what the line-by-line path gives
(``encode_lines(line_for(trip_from_row(row)))``, protobuf's own deterministic
serialization), with the same totals and the same lines and claim per operator:
a batch sent again after a crash must hash to the digest the home stored, whichever
release built it. Rows are generated (hypothesis) over every field's range, with the
testbed's sample fare rules and agreement.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.cards.model import DecisionSource, Entitlement, Scene
from broker.fares.rules import FareSchedule
from broker.node.config import NodeConfig
from broker.settlement.clearing.batch import CHUNK_LINES, Totals, chunked, encode_lines
from broker.settlement.clearing.rows import RowEncoder, counting, row_chunks, scheme_by, varint
from broker.settlement.clearing.sender import line_for
from broker.settlement.ledger.common import trip_from_row
from tests.settlement.clearing.pair import HOME, OPERATOR, SERVING, THIRD, World, sample_fares

FARES = sample_fares(SERVING)

texts = st.text(min_size=0, max_size=12)
amounts = st.integers(min_value=0, max_value=2**40)
instants = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)
rows = st.tuples(
    st.sampled_from([OPERATOR, "other-op", ""]),
    texts,  # trip id
    st.sampled_from([HOME, THIRD, SERVING]),
    texts,  # card number
    st.sampled_from([s.value for s in Scene if s.value]),
    st.sampled_from(["", "p-1", "博物馆"]),
    st.one_of(instants, instants.map(lambda d: d.isoformat())),  # SQLite keeps text
    amounts,
    amounts,
    amounts,
    st.sampled_from([0, *(e.value for e in Entitlement)]),
    st.sampled_from(["sample-1", "ghost-9", ""]),
    # gate id and decision source as trip_gates gives them: none, or "gate|source"
    st.one_of(
        st.none(),
        st.tuples(texts, st.sampled_from([0, *(s.value for s in DecisionSource)])).map(
            lambda gs: f"{gs[0]}|{gs[1]}"
        ),
    ),
)


def slow(
    blocks: list[list[tuple[Any, ...]]], cfg: NodeConfig, fares: FareSchedule | None
) -> tuple[list[tuple[bytes, int]], Totals, dict[str, tuple[int, int]]]:
    totals, by_operator = Totals(), {}  # type: ignore[var-annotated]
    lines = (line_for(trip_from_row(r), cfg, fares) for b in blocks for r in b)
    return list(chunked(counting(lines, totals, by_operator))), totals, by_operator


def fast(
    blocks: list[list[tuple[Any, ...]]], cfg: NodeConfig, fares: FareSchedule | None
) -> tuple[list[tuple[bytes, int]], Totals, dict[str, tuple[int, int]]]:
    totals, by_operator = Totals(), {}  # type: ignore[var-annotated]
    encoder = RowEncoder(scheme_by(fares), cfg.agreement)
    return list(row_chunks(blocks, encoder, totals, by_operator)), totals, by_operator


def config(tmp_path: Path) -> NodeConfig:
    world = World(tmp_path)
    try:
        return world[SERVING].cfg
    finally:
        world.close()


def test_varints_are_protobufs() -> None:
    assert varint(0) == b"\x00"
    assert varint(127) == b"\x7f"
    assert varint(300) == b"\xac\x02"
    assert varint(-1) == b"\xff" * 9 + b"\x01"  # int64 -1: ten bytes


@settings(max_examples=300, deadline=None)
@given(rows=st.lists(rows, min_size=1, max_size=6))
def test_a_row_encodes_to_the_bytes_of_its_line(tmp_path_factory: Any, rows: list[Any]) -> None:
    cfg = CFG.get() or CFG.set(config(tmp_path_factory.mktemp("cfg")))
    for fares in (FARES, None):
        assert fast([rows], cfg, fares) == slow([rows], cfg, fares)


def test_chunks_are_cut_where_the_line_by_line_path_cuts_them(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    at = datetime(2026, 3, 10, 2, tzinfo=UTC)
    every = [
        (
            OPERATOR if i % 3 else "other-op",
            f"t-{i}",
            HOME if i % 5 else THIRD,
            f"{i % 7:08d}",
            1 + i % 4,
            "",
            at + timedelta(microseconds=i),
            300,
            150 if i % 2 else 0,
            150 if i % 2 else 300,
            (i % 6),
            "sample-1",
            None if i % 4 else f"g-{i}|{i % 6}",  # a gate and a source 0 (none) to 5
        )
        for i in range(2 * CHUNK_LINES + 17)
    ]
    blocks = [every[i : i + 777] for i in range(0, len(every), 777)]  # blocks not chunk-sized
    got, want = fast(blocks, cfg, FARES), slow(blocks, cfg, FARES)
    assert [n for _, n in got[0]] == [CHUNK_LINES, CHUNK_LINES, 17]
    assert got == want
    assert got[1].lines == len(every)
    assert encode_lines([]) == b""  # an empty batch has no chunk on either path
    assert fast([], cfg, FARES)[0] == slow([], cfg, FARES)[0] == []


class _Once:
    value: NodeConfig | None = None

    def get(self) -> NodeConfig | None:
        return self.value

    def set(self, value: NodeConfig) -> NodeConfig:
        self.value = value
        return value


CFG = _Once()
