"""Clearing inside a node (broker.settlement.clearing.service): the Receiver off the event loop.

Built from a testbed district's real config, trust store and registry (the
``districts`` fixture); DAZU's real settlement key signs what ANYUE's service
receives, and ANYUE learns that key from DAZU's trust bundle.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from broker.cards.model import Scene, shanghai_day
from broker.cards.registry import Registry
from broker.core.errors import DocumentRefused
from broker.core.signing import Purpose, Signed, Signer, unsigned_body, verify
from broker.fares.rules import fares_document, load_fares
from broker.settlement.clearing.batch import Line
from broker.settlement.clearing.service import ClearingService
from broker.settlement.clearing.store import ClearingStore
from broker.settlement.days import window_end
from broker.settlement.ledger import open_ledger
from broker.settlement.ledger.store import seal_day
from broker.settlement.trips import ACCEPT, Trip
from broker.testbed.build import DistrictSetup
from broker.trust.store import TrustStore
from tests.conftest import ANYUE, DAZU
from tests.settlement.clearing.pair import signed_batch


class Node:
    """ANYUE's clearing service, and what DAZU sends it."""

    def __init__(self, districts: dict[str, DistrictSetup], now: datetime) -> None:
        self.anyue, self.dazu = districts[ANYUE], districts[DAZU]
        cfg = self.anyue.config
        self.registry = Registry(cfg.registry)
        assert cfg.fares.file is not None
        self.now = now  # the service's clock; a test moves it on
        self.service = ClearingService(
            cfg, self.registry, TrustStore(cfg), load_fares(cfg.fares.file), lambda: self.now
        )
        self.dazu_signer = Signer.from_file(self.dazu.paths.settlement_key)
        self.anyue_keys = Signer.from_file(self.anyue.paths.settlement_key).public_keys()
        self.when = now - timedelta(minutes=10)
        self.period = shanghai_day(self.when)

    def fares(self) -> Signed:
        assert self.dazu.config.fares.file is not None
        schedule = load_fares(self.dazu.config.fares.file)
        return self.dazu_signer.sign(
            {"type": "fares", **fares_document(schedule), "district": DAZU}, Purpose.FARES
        )

    def full_fare(self, trip_id: str) -> Line:
        """A bus ride on a full fare by an ANYUE card that is active: always acceptable."""
        today = shanghai_day(self.when)
        c = next(c for c in self.anyue.cards if c.status == "active" and c.valid_until > today)
        t = Trip(
            "transit-01", trip_id, c.ref, Scene.BUS, "", self.when, 200, 200, 0, None, "sample-1"
        )
        return Line(t, "", 200)


@pytest.fixture
async def node(districts: dict[str, DistrictSetup], now: datetime) -> AsyncIterator[Node]:
    n = Node(districts, now)
    yield n
    n.service.close()
    n.registry.close()


def spy(
    node: Node,
    name: str,
    seen: list[str],
    wait: threading.Event | None = None,
    started: threading.Event | None = None,
) -> None:
    """Wrap one Receiver method: note the thread it runs on (and wait for the loop if told)."""
    real: Callable[..., Any] = getattr(node.service.receiver, name)

    def wrapped(*args: Any) -> Any:
        seen.append(threading.current_thread().name)
        if started is not None:
            started.set()
        if wait is not None:
            assert wait.wait(timeout=10), "the event loop was blocked"
        return real(*args)

    setattr(node.service.receiver, name, wrapped)


async def test_the_receivers_answers_come_back_awaited_from_its_worker_thread(node: Node) -> None:
    """Fare rules and confirmations on the service's thread; batches in its worker process."""
    seen: list[str] = []
    for name in ("publish_fares", "receive", "confirm"):
        spy(node, name, seen)
    assert await node.service.publish_fares(DAZU, node.fares()) == ["sample-1"]
    spool, trailer = signed_batch(
        node.dazu_signer, [node.full_fare("t-1")], frm=DAZU, to=ANYUE, period=node.period
    )
    try:
        ack = await node.service.receive(DAZU, spool, trailer)
    finally:
        spool.close()
    doc = verify(ack.signed, node.anyue_keys, Purpose.ACK)  # signed with ANYUE's settlement key
    assert (doc["accepted"], doc["accepted_claim_fen"]) == (1, 200)
    position = node.dazu_signer.sign(
        {
            "type": "position",
            "from": DAZU,
            "to": ANYUE,
            "period": node.period.isoformat(),
            "receivable_fen": 200,
            "payable_fen": 0,
        },
        Purpose.POSITION,
    )
    node.now = window_end(node.period) + timedelta(minutes=1)
    store = ClearingStore.open(node.anyue.config)
    try:
        with store.trips.write():  # ANYUE's sealing close (nothing of its own to send)
            seal_day(store.trips, node.period, node.now)
    finally:
        store.close()
    reply = await node.service.confirm(DAZU, position)
    assert verify(reply, node.anyue_keys, Purpose.POSITION)["agreed"] is True
    assert len(seen) == 2 and len(set(seen)) == 1  # receive ran in the worker process
    row = node.service.store.db.one("SELECT lines FROM in_batches WHERE sender = ?", (DAZU,))
    assert row == (1,)  # and committed what it verified, where this process reads it
    assert seen[0].startswith("clearing") and seen[0] != threading.current_thread().name


async def test_keys_come_from_the_senders_trust_bundle(node: Node) -> None:
    stranger = Signer(ed25519.Ed25519PrivateKey.generate())
    signed = stranger.sign(unsigned_body(node.fares().content()), Purpose.FARES)
    with pytest.raises(DocumentRefused, match="not trusted"):
        await node.service.publish_fares(DAZU, signed)
    with pytest.raises(DocumentRefused, match="not trusted"):  # DAZU's key, for another
        await node.service.publish_fares("500153", node.fares())


async def test_the_event_loop_runs_while_the_receiver_works(node: Node) -> None:
    """The receiver waits for the loop to set an event: it can only if it is not on the loop."""
    seen: list[str] = []
    go, started = threading.Event(), threading.Event()
    spy(node, "publish_fares", seen, wait=go, started=started)
    call = asyncio.ensure_future(node.service.publish_fares(DAZU, node.fares()))
    assert await asyncio.to_thread(started.wait, 10)
    assert not call.done()
    go.set()
    assert await call == ["sample-1"]


async def test_statement_reads_the_nodes_ledger(node: Node, now: datetime) -> None:
    assert await node.service.statement(node.period, None) == []
    cfg = node.anyue.config
    ledger = open_ledger(cfg.ledger.path, None)
    try:
        dazu_card = next(c for c in node.dazu.cards if c.status == "active")
        trip = Trip(
            "transit-01",
            "a-1",
            dazu_card.ref,
            Scene.BUS,
            "",
            node.when,
            200,
            200,
            0,
            None,
            "sample-1",
        )
        ledger.record([(trip, ACCEPT)], now)
    finally:
        ledger.close()
    (line,) = await node.service.statement(node.period, "transit-01")
    assert (line.home_district, line.trips, line.claimed_fen, line.accepted_fen) == (
        DAZU,
        1,
        200,
        0,  # not acknowledged by DAZU yet
    )
    assert await node.service.statement(node.period, "someone-else") == []


async def test_close_shuts_the_worker_and_the_databases(
    districts: dict[str, DistrictSetup], now: datetime
) -> None:
    n = Node(districts, now)
    try:
        assert await n.service.publish_fares(DAZU, n.fares()) == ["sample-1"]
        n.service.close()
        with pytest.raises(RuntimeError, match="shutdown"):
            await n.service.publish_fares(DAZU, n.fares())
        with pytest.raises(sqlite3.ProgrammingError):
            n.service.store.db.one("SELECT 1")
    finally:
        n.registry.close()


def test_the_clock_is_the_one_given(districts: dict[str, DistrictSetup]) -> None:
    """What the service stores is stamped by its clock, not the wall clock."""
    fixed = datetime(2026, 3, 11, 1, 0, tzinfo=UTC)
    n = Node(districts, fixed)
    try:
        n.service.receiver.publish_fares(DAZU, n.fares())
        row = n.service.store.db.one("SELECT received_at FROM published_fares")
        assert row == ("2026-03-11T01:00:00.000000+00:00",)
    finally:
        n.service.close()
        n.registry.close()
