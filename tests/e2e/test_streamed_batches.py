"""A batch the sender names in its call's metadata is verified by the home as it arrives.

Dazu's parts reach Anyue's real node (mutual TLS, its verifier process) one by one,
with the hint a close sends (:class:`broker.settlement.clearing.tail.Hint`). The
verifier checks the chunks inside a transaction it commits only once the signed
trailer checks out; a call cancelled mid-stream, or a trailer that fails, leaves
nothing stored and no spool or pipe open, and the next batch is verified as usual.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric import ed25519

from broker.cards.model import shanghai_day
from broker.core.signing import Signer
from broker.settlement.clearing.tail import Hint
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
from tests.e2e.test_clearing_checks import dazu_signer, publish_dazu_fares


def pipes() -> set[str]:
    """This process's open pipes (the node's end pipes to its verifier are some)."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("pipe:"):
            found.add(f"{name}:{target}")
    return found


def stored(cluster: Cluster, table: str) -> int:
    """Rows of batch 1 (the one each test sends; the warm-up is another)."""
    clearing = cluster.nodes[ANYUE].clearing
    assert clearing is not None
    seq = " AND seq = 1" if table != "in_line_presentments" else ""
    row = clearing.store.db.one(f"SELECT count(*) FROM {table} WHERE sender = ?{seq}", (DAZU,))
    return int(row[0]) if row else 0


async def warm_up(cluster: Cluster, now: datetime) -> None:
    """Fares published, and an empty batch (sequence 9, no hint) through the verifier:
    its process and the pipes it talks over exist before a test looks at the pipes."""
    await publish_dazu_fares(cluster)
    feed = Feed(cluster)
    try:
        feed.send(*batch([], dazu_signer(cluster), now, 9))
        feed.end()
        assert b'"lines":0' in (await feed.replies())[-1].ack.document
    finally:
        await feed.close()


async def named_batch(cluster: Cluster, now: datetime) -> tuple[Hint, list[Any], Feed]:
    """Five lines of Dazu's, sequence 1, in chunks of 2, and a call named for them (the
    node warmed up first). The call opens when its first part is sent."""
    await warm_up(cluster, now)
    when = now - timedelta(minutes=5)
    hint = Hint(shanghai_day(when), 1, "close")
    parts = batch(lines_for(cluster, 5, when), dazu_signer(cluster), now, 1, 2)
    return hint, parts, Feed(cluster, metadata=hint.metadata())


async def test_a_named_batch_is_verified_as_it_arrives_and_answered(
    cluster: Cluster, now: datetime
):
    _, parts, feed = await named_batch(cluster, now)
    before, open_pipes = spool_files(), pipes()
    try:
        feed.send(*parts[:-1])
        await new_spool_file(before)
        assert stored(cluster, "in_lines") == 0  # nothing committed before the trailer
        feed.send(parts[-1])
        feed.end()
        replies = await feed.replies()
        assert b'"accepted":5' in replies[-1].ack.document
        assert (stored(cluster, "in_batches"), stored(cluster, "in_lines")) == (1, 5)
        await no_spool_file_left(before)
        await eventually(lambda: pipes() <= open_pipes, "an end pipe is still open")
    finally:
        await feed.close()


async def test_a_cancel_mid_stream_commits_nothing_and_leaves_no_open_file(
    cluster: Cluster, now: datetime
):
    hint, parts, feed = await named_batch(cluster, now)
    before, open_pipes = spool_files(), pipes()
    try:
        feed.send(*parts[:2])  # 4 of 5 lines: the verifier checks them meanwhile
        await new_spool_file(before)
        feed.call.cancel()
        await no_spool_file_left(before)  # once the verifier let go of it
        await eventually(lambda: pipes() <= open_pipes, "an end pipe is still open")
        assert (stored(cluster, "in_batches"), stored(cluster, "in_lines")) == (0, 0)
        assert stored(cluster, "in_line_presentments") == 0
    finally:
        await feed.close()
    # The verifier is free, and the batch sent again is verified whole.
    again = Feed(cluster, metadata=hint.metadata())
    try:
        again.send(*parts)
        again.end()
        assert b'"accepted":5' in (await again.replies())[-1].ack.document
    finally:
        await again.close()


async def test_a_trailer_that_fails_after_the_chunks_were_verified_commits_nothing(
    cluster: Cluster, now: datetime
):
    await warm_up(cluster, now)
    when = now - timedelta(minutes=5)
    hint = Hint(shanghai_day(when), 1, "close")
    lines = lines_for(cluster, 5, when)
    stranger = Signer(ed25519.Ed25519PrivateKey.generate())
    stranger.key_id = dazu_signer(cluster).key_id  # a forged signature under Dazu's key id
    before = spool_files()
    feed = Feed(cluster, metadata=hint.metadata())
    try:
        feed.send(*batch(lines, stranger, now, 1, 2))
        feed.end()
        err = await feed.refusal()
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "signature does not verify" in (err.details() or "")
        assert (stored(cluster, "in_batches"), stored(cluster, "in_lines")) == (0, 0)
        await no_spool_file_left(before)
    finally:
        await feed.close()
    # A wrong word for the batch (another sequence): verified whole, as if none was given.
    wrong = Feed(cluster, metadata=Hint(hint.period, 7, "close").metadata())
    try:
        wrong.send(*batch(lines, dazu_signer(cluster), now, 1, 2))
        wrong.end()
        doc = (await wrong.replies())[-1].ack.document
        assert b'"accepted":5' in doc and b'"sequence":1' in doc
    finally:
        await wrong.close()
