"""broker/settlement/clearing/worker.py: batches verified in a niced process of their own.

ANYUE's real clearing service (tests/settlement/clearing/test_service.py's ``Node``)
receives batches DAZU's real settlement key signed; the verifier's process is
looked at from outside (its pid, its niceness) and killed like a crash would.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime

import pytest

from broker.core.errors import DocumentRefused, PeerUnavailable
from broker.core.priority import in_background
from broker.core.signing import Purpose, verify
from broker.settlement.clearing.worker import NICE
from broker.testbed.build import DistrictSetup
from tests.conftest import ANYUE, DAZU
from tests.settlement.clearing.pair import signed_batch
from tests.settlement.clearing.test_service import Node


@pytest.fixture
async def node(districts: dict[str, DistrictSetup], now: datetime) -> AsyncIterator[Node]:
    n = Node(districts, now)
    yield n
    n.service.close()
    n.registry.close()


async def receive(node: Node, seq: int, *trip_ids: str, tamper: bool = False) -> object:
    if seq == 1:
        assert await node.service.publish_fares(DAZU, node.fares()) == ["sample-1"]
    spool, trailer = signed_batch(
        node.dazu_signer,
        [node.full_fare(t) for t in trip_ids],
        frm=DAZU,
        to=ANYUE,
        period=node.period,
        seq=seq,
        overrides={"claimed_fen": 1} if tamper else None,
    )
    try:
        return await node.service.receive(DAZU, spool, trailer)
    finally:
        spool.close()


def worker_pids(node: Node) -> list[int]:
    pool = node.service._verifier._pool
    assert pool is not None
    return list(pool._processes)


async def test_a_batch_is_verified_in_a_background_process_of_its_own(node: Node) -> None:
    """Behind the node's threads: SCHED_IDLE on Linux (niced elsewhere)."""
    ack = await receive(node, 1, "w-1", "w-2")
    doc = verify(ack.signed, node.anyue_keys, Purpose.ACK)  # type: ignore[attr-defined]
    assert (doc["accepted"], doc["accepted_claim_fen"]) == (2, 400)
    [pid] = worker_pids(node)
    assert pid != os.getpid()
    if hasattr(os, "SCHED_IDLE"):
        assert os.sched_getscheduler(pid) == os.SCHED_IDLE
    else:
        assert os.getpriority(os.PRIO_PROCESS, pid) == min(
            19, os.getpriority(os.PRIO_PROCESS, 0) + NICE
        )
    assert in_background(pid)


async def test_a_refusal_in_the_worker_is_the_same_refusal_here(node: Node) -> None:
    with pytest.raises(DocumentRefused, match="totals do not match"):
        await receive(node, 1, "w-1", tamper=True)
    assert node.service.store.db.one("SELECT count(*) FROM in_batches") == (0,)


async def test_a_worker_that_dies_fails_the_call_unavailable_and_the_next_batch_gets_a_new_one(
    node: Node,
) -> None:
    await receive(node, 1, "w-1")
    [first] = worker_pids(node)
    os.kill(first, signal.SIGKILL)  # as a crash, or the OOM killer, would
    with pytest.raises(PeerUnavailable, match="send the batch again"):
        await receive(node, 2, "w-2")
    ack = await receive(node, 2, "w-2")  # sent again: a new worker verifies it
    assert verify(ack.signed, node.anyue_keys, Purpose.ACK)["accepted"] == 1  # type: ignore[attr-defined]
    assert worker_pids(node) != [first]


async def test_with_worker_cpus_the_verifier_keeps_to_them(
    districts: dict[str, DistrictSetup], now: datetime
) -> None:
    """settlement.worker_cpus: the verifier's process (and its kernel work) stays on them."""
    cpu = max(os.sched_getaffinity(0))
    anyue = districts[ANYUE]
    settlement = replace(anyue.config.settlement, worker_cpus=(cpu,))
    placed = {
        **districts,
        ANYUE: replace(anyue, config=replace(anyue.config, settlement=settlement)),
    }
    n = Node(placed, now)
    try:
        await receive(n, 1, "w-1")
        [pid] = worker_pids(n)
        assert os.sched_getaffinity(pid) == {cpu}
        assert in_background(pid)
    finally:
        n.service.close()
        n.registry.close()
