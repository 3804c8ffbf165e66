"""Raw batches for end-to-end tests of ExchangeBatch: Dazu's lines to Anyue, chunk by chunk,
fed by the test at its own pace; and the spool files a node holds open meanwhile."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from datetime import datetime

import grpc

from broker._proto.yikatong.v1 import settlement_pb2, settlement_pb2_grpc
from broker.cards.model import shanghai_day
from broker.core.signing import Purpose, Signer
from broker.settlement.clearing.batch import CHUNK_LINES, Digest, Line, Totals, chunked
from tests.conftest import ANYUE, DAZU, Cluster
from tests.e2e.test_clearing_checks import anyue_card, full_fare_line
from tests.helpers import node_channel


def lines_for(cluster: Cluster, n: int, when: datetime, prefix: str = "r") -> list[Line]:
    card = anyue_card(cluster)
    return [full_fare_line(card, f"{prefix}-{i:07d}", when, "sample-1") for i in range(n)]


def batch(
    lines: list[Line], signer: Signer, when: datetime, seq: int, chunk_lines: int = CHUNK_LINES
) -> list[settlement_pb2.BatchPart]:
    """Every part of a signed batch from Dazu to Anyue: its chunks, then the trailer."""
    chunks = [c for c, _ in chunked(lines, chunk_lines)]
    digest, totals = Digest(), Totals()
    for c in chunks:
        digest.update(c)
    for line in lines:
        totals.add(line)
    header = signer.sign(
        {
            "type": "batch",
            "from": DAZU,
            "to": ANYUE,
            "period": shanghai_day(when).isoformat(),
            "sequence": seq,
            "kind": "close",
            "created_at": "2026-11-28T00:00:00+00:00",
            **totals.as_doc(),
            "digest": digest.hexdigest(),
            "chunks": digest.chunks,
        },
        Purpose.BATCH,
    )
    trailer = settlement_pb2.SignedDocument(
        document=header.document, key_id=header.key_id, signature=header.signature
    )
    return [settlement_pb2.BatchPart(lines=c) for c in chunks] + [
        settlement_pb2.BatchPart(trailer=trailer)
    ]


class Feed:
    """An ExchangeBatch call from Dazu's node to Anyue's whose parts the test sends one by one."""

    def __init__(
        self,
        cluster: Cluster,
        timeout: float = 60,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> None:
        self.channel = node_channel(
            cluster.nodes[ANYUE].address, cluster.setups[ANYUE], cluster.setups[DAZU]
        )
        self._queue: asyncio.Queue[settlement_pb2.BatchPart | None] = asyncio.Queue()
        self.call = settlement_pb2_grpc.SettlementStub(self.channel).ExchangeBatch(
            self._parts(), timeout=timeout, metadata=metadata
        )

    async def _parts(self) -> AsyncIterator[settlement_pb2.BatchPart]:
        while (part := await self._queue.get()) is not None:
            yield part

    def send(self, *parts: settlement_pb2.BatchPart) -> None:
        for p in parts:
            self._queue.put_nowait(p)

    def end(self) -> None:
        self._queue.put_nowait(None)

    async def replies(self) -> list[settlement_pb2.AckPart]:
        return [p async for p in self.call]

    async def refusal(self) -> grpc.aio.AioRpcError:
        try:
            await self.replies()
        except grpc.aio.AioRpcError as exc:
            return exc
        raise AssertionError("the call was not refused")

    async def close(self) -> None:
        await self.channel.close()


def spool_files() -> dict[int, str]:
    """This process's open anonymous temporary files (a spool's file is one), by descriptor."""
    tmp = tempfile.gettempdir().rstrip("/") + "/"
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # closed meanwhile (the listing's own descriptor, or another's)
            continue
        if target.startswith(tmp) and target.endswith("(deleted)"):
            found[int(name)] = target
    return found


async def eventually(check: Callable[[], bool], what: str, within: float = 5.0) -> None:
    """Waits until ``check()`` holds; fails naming ``what`` after ``within`` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        if check():
            return
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.02)


async def new_spool_file(before: dict[int, str]) -> int:
    """The descriptor of the one spool file opened since ``before`` (waits for it)."""
    new: list[tuple[int, str]] = []

    def opened() -> bool:
        new[:] = sorted(set(spool_files().items()) - set(before.items()))
        return bool(new)

    await eventually(opened, "no spool file was opened")
    assert len(new) == 1, new
    return new[0][0]


async def no_spool_file_left(before: dict[int, str]) -> None:
    """Waits until every spool file opened since ``before`` is closed."""
    await eventually(
        lambda: not set(spool_files().items()) - set(before.items()), "a spool file is still open"
    )
