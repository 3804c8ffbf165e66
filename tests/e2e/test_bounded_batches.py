"""A neighbour's batch is bounded as it arrives, and its spool never outlives the call.

Anyue's node here takes at most 3 lines and 1,000 bytes of lines a batch
(``[settlement] max_batch_lines`` / ``max_batch_bytes``). The spool is an
anonymous temporary file (no name on disk, gone when closed) of the node, which
runs in this process: the tests watch it in /proc/self/fd, and read its size
through a descriptor of their own.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import grpc
import pytest

from broker.node.server import Node
from broker.settlement.clearing import crash
from broker.settlement.clearing.batch import Line
from broker.testbed import build as testbed
from broker.testbed.clock import DayClock
from tests.conftest import ANYUE, DAZU, Cluster
from tests.e2e.raw_batches import (
    Feed,
    batch,
    eventually,
    lines_for,
    new_spool_file,
    no_spool_file_left,
    spool_files,
)
from tests.e2e.test_clearing_checks import dazu_signer

# Only the exchanges: every node also follows its peers (WatchStatus streams).
EXCHANGE = "/yikatong.v1.Settlement/ExchangeBatch"

MAX_LINES, MAX_BYTES = 3, 1000


@pytest.fixture
async def bounded(districts: dict[str, testbed.DistrictSetup]) -> AsyncIterator[Cluster]:
    s = districts[ANYUE]
    settlement = replace(s.config.settlement, max_batch_lines=MAX_LINES, max_batch_bytes=MAX_BYTES)
    districts[ANYUE] = replace(s, config=replace(s.config, settlement=settlement))
    clock = DayClock()
    nodes = {code: await Node.start(d.config, clock) for code, d in districts.items()}
    c = Cluster(districts, nodes, clock)
    try:
        yield c
    finally:
        await c.close()


def spooled_bytes(fd: int) -> int:
    """How much the spool behind the node's descriptor ``fd`` holds, even after it closes."""
    return os.fstat(fd).st_size


async def test_the_chunk_over_the_line_limit_is_refused_before_it_is_spooled(
    bounded: Cluster, now: datetime
):
    parts = batch(
        lines_for(bounded, 5, now - timedelta(minutes=5)), dazu_signer(bounded), now, 1, 2
    )
    before = spool_files()
    feed = Feed(bounded)
    try:
        feed.send(parts[0])  # 2 lines: within the limit, spooled
        node_fd = await new_spool_file(before)
        mine = os.open(f"/proc/self/fd/{node_fd}", os.O_RDONLY)  # the same file, held by the test
        try:
            first = 8 + len(parts[0].lines)
            await eventually(lambda: spooled_bytes(mine) == first, "chunk 1 is not spooled")
            feed.send(parts[1])  # 2 more: 4 > 3
            err = await feed.refusal()
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "settlement.max_batch_lines" in (err.details() or ""), err.details()
            await no_spool_file_left({**before, mine: os.readlink(f"/proc/self/fd/{mine}")})
            # What the spool ever held: the first chunk only, never the one over the limit.
            assert spooled_bytes(mine) == 8 + len(parts[0].lines)
        finally:
            os.close(mine)
    finally:
        await feed.close()


async def test_a_first_chunk_over_the_byte_limit_is_refused_and_nothing_is_left(
    bounded: Cluster, now: datetime
):
    line = lines_for(bounded, 1, now - timedelta(minutes=5))[0]
    huge = Line(replace(line.trip, place_id="p" * MAX_BYTES), line.scheme, line.claimed_fen)
    parts = batch([huge], dazu_signer(bounded), now, 1)
    assert len(parts[0].lines) > MAX_BYTES
    before = spool_files()
    feed = Feed(bounded)
    try:
        feed.send(*parts)
        feed.end()
        err = await feed.refusal()
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "settlement.max_batch_bytes" in (err.details() or ""), err.details()
        await no_spool_file_left(before)
    finally:
        await feed.close()


async def test_a_batch_within_the_limits_is_received(bounded: Cluster, now: datetime):
    parts = batch(lines_for(bounded, 3, now - timedelta(minutes=5)), dazu_signer(bounded), now, 1)
    before = spool_files()
    feed = Feed(bounded)
    try:
        feed.send(*parts)
        feed.end()
        replies = await feed.replies()
        assert b'"lines":3' in replies[-1].ack.document
        await no_spool_file_left(before)
    finally:
        await feed.close()


async def test_a_cancel_mid_spool_leaves_no_open_file(bounded: Cluster, now: datetime):
    parts = batch(
        lines_for(bounded, 3, now - timedelta(minutes=5)), dazu_signer(bounded), now, 1, 2
    )
    before = spool_files()
    feed = Feed(bounded)
    try:
        feed.send(parts[0])
        await new_spool_file(before)  # the node is spooling
        feed.call.cancel()
        await no_spool_file_left(before)
        guard = bounded.nodes[ANYUE].guard
        assert guard is not None
        assert guard.streams.count(EXCHANGE) == 0  # the call is gone from the node
    finally:
        await feed.close()


async def test_a_cancel_while_the_batch_is_verified_never_closes_the_spool_under_the_worker(
    bounded: Cluster, now: datetime, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """The verifier process is held before it reads the spool; the caller cancels meanwhile.
    The spool stays open until the verifier is done with it, which verifies and stores the
    whole batch, then closes."""
    release = tmp_path / "release"
    monkeypatch.setenv(crash.PAUSE_ENV, "verify_started")  # the verifier inherits these
    monkeypatch.setenv(crash.PAUSE_FILE_ENV, str(release))
    reached = release.with_name(release.name + ".reached")
    parts = batch(
        lines_for(bounded, 3, now - timedelta(minutes=5)), dazu_signer(bounded), now, 1, 2
    )
    before = spool_files()
    feed = Feed(bounded)
    guard = bounded.nodes[ANYUE].guard
    clearing = bounded.nodes[ANYUE].clearing
    assert guard is not None and clearing is not None
    try:
        feed.send(*parts)
        feed.end()
        await eventually(reached.exists, "the verifier did not start", within=30)
        feed.call.cancel()
        await eventually(
            lambda: guard.streams.count(EXCHANGE) == 0, "the call did not end on the node"
        )
        assert set(spool_files().items()) - set(before.items()), "closed under the verifier"
        release.touch()
        stored = "SELECT lines FROM in_batches WHERE sender = ?"
        await eventually(
            lambda: clearing.store.db.one(stored, (DAZU,)) == (3,),
            "the verifier did not store the batch",
            within=10,
        )
        await no_spool_file_left(before)
    finally:
        release.touch()
        await feed.close()
