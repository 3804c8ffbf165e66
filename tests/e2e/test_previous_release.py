"""Districts upgrade on different days: a settlement day between this release and the previous.

Dazu runs this release in-process; Anyue runs the previous release's code
(tests/e2e/previous_release.py) as a separate ``broker serve`` process, and its
operator staff run that release's ``broker settle`` commands. Between them, over
mutual TLS, every signed settlement document crosses in both directions:

- this release sends fare rules, a batch trailer and a position that the previous
  release verifies and reads (new documents carry ``key_id`` and ``purpose``);
- the previous release sends fare rules, a batch trailer and a position that this
  release verifies (documents without them: purpose taken from the RPC), and each
  side acknowledges the other's batch and answers its position.

Both days end SETTLED on both sides with the same figures, which is only possible if
each release read the other's documents exactly.
"""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import grpc
import pytest

from broker._proto.yikatong.v1 import settlement_pb2, settlement_pb2_grpc
from broker.cards.model import Scene, shanghai_day
from broker.node.server import Node
from broker.settlement.clearing.positions import positions
from broker.settlement.clearing.session import open_sender
from broker.settlement.days import day_end, window_end
from broker.testbed import build as testbed
from broker.testbed.demo_day import _trips
from broker.testbed.operator_client import GateClient
from tests.conftest import ANYUE, DAZU
from tests.e2e import previous_release

pytestmark = pytest.mark.timeout(240)


@dataclass
class Mixed:
    setups: dict[str, testbed.DistrictSetup]
    node: Node  # Dazu, this release
    old: subprocess.Popen[bytes]  # Anyue, the previous release
    channels: dict[str, grpc.aio.Channel]
    gates: dict[str, GateClient]


async def wait_listening(address: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = await asyncio.to_thread(log.read_text)
            pytest.fail(f"the previous release's node exited:\n{text[-3000:]}")
        try:
            with socket.create_connection((host, int(port)), timeout=0.5):
                return
        except OSError:
            await asyncio.sleep(0.1)
    pytest.fail(f"the previous release's node did not listen on {address}")


@pytest.fixture
async def mixed(tmp_path: Path, previous_tree: Path, now: datetime) -> AsyncIterator[Mixed]:
    setups = testbed.build(tmp_path, (DAZU, ANYUE), now, cards_per_district=40)
    log = tmp_path / "anyue-previous-release.log"
    with log.open("wb") as out:
        serve = ("serve", "--config", str(setups[ANYUE].config_path))
        old = subprocess.Popen(  # noqa: ASYNC220 - starts it, does not wait for it
            [sys.executable, "-c", "from broker.cli.main import main; main()", *serve],
            cwd=previous_tree,
            env=previous_release.environment(previous_tree),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    node = await Node.start(setups[DAZU].config)
    channels: dict[str, grpc.aio.Channel] = {}
    try:
        await wait_listening(setups[ANYUE].config.listen, old, log)
        addresses = {DAZU: node.address, ANYUE: setups[ANYUE].config.listen}
        for code, s in setups.items():
            channels[code] = s.operator_channel(addresses[code])
        gates = {code: GateClient(channels[code], s.operator_id) for code, s in setups.items()}
        yield Mixed(setups, node, old, channels, gates)
    finally:
        for ch in channels.values():
            await ch.close()
        await node.stop(grace=0.2)
        old.terminate()
        try:
            old.wait(timeout=10)
        except subprocess.TimeoutExpired:
            old.kill()


async def until_each_recognises_the_other(m: Mixed) -> None:
    """Each node's peer channel may be in back-off from before the other listened."""
    deadline = time.monotonic() + 20
    for code, other in ((DAZU, ANYUE), (ANYUE, DAZU)):
        card = next(c for c in m.setups[other].cards if c.status == "active")
        while not (await m.gates[code].check(card.ref, Scene.BUS)).allow:
            assert time.monotonic() < deadline, f"{code} never recognised {other}'s cards"
            await asyncio.sleep(0.2)


async def submit_day(m: Mixed, now: datetime) -> datetime:
    """Each district's operator uploads trips of the other district's card-holders."""
    await until_each_recognises_the_other(m)
    when = now - timedelta(minutes=30)
    rng = random.Random(9)
    for code, other in ((DAZU, ANYUE), (ANYUE, DAZU)):
        trips = await _trips(
            m.setups[code], m.gates[code], [m.setups[other]], when, rng, 15, f"mixed-{code}"
        )
        assert len(trips) >= 10, "the gates must have recognised the other district's cards"
        stub = settlement_pb2_grpc.SettlementStub(m.channels[code])
        reply = await stub.SubmitTrips(settlement_pb2.SubmitTripsRequest(trips=trips))
        assert len(reply.results) == len(trips)
    return when


async def test_a_settlement_day_between_this_release_and_the_previous_one(
    mixed: Mixed, previous_tree: Path, now: datetime
):
    period = shanghai_day(await submit_day(mixed, now))
    dazu, anyue = mixed.setups[DAZU], mixed.setups[ANYUE]

    # This release closes (the next morning, by its clock): fare rules and a batch go to
    # the previous release, its ack back.
    morning = day_end(period) + timedelta(minutes=1)
    async with open_sender(dazu.config, clock=lambda: morning) as sender:
        report = await sender.close(period)
    assert report.failures == []
    [sent] = report.batches
    assert sent.counterparty == ANYUE and sent.lines >= 10
    assert sent.accepted_claim_fen == sent.claimed_fen > 0  # every line read and accepted

    # The previous release closes: its fare rules and batch come here, our ack goes back.
    closed = await asyncio.to_thread(  # off the loop: this release's node must answer it
        previous_release.cli,
        previous_tree,
        "settle",
        "close",
        "--config",
        str(anyue.config_path),
        "--period",
        period.isoformat(),
    )
    assert DAZU in closed.stdout

    # This release proposes the day's position once its late window has closed and a close
    # sealed the day; the previous release agrees.
    later = window_end(period) + timedelta(minutes=1)
    async with open_sender(dazu.config, clock=lambda: later) as sender:
        assert (await sender.close(period)).batches == []  # seals the day: nothing new
        agreed = await sender.confirm(ANYUE, period)
        assert agreed.state == "settled"
        [ours] = positions(sender.store, period, DAZU)
        fares = sender.store.db.all(
            "SELECT version FROM published_fares WHERE district = ?", (ANYUE,)
        )
        acks = {
            "theirs": sender.store.db.one(
                "SELECT ack FROM out_batches WHERE counterparty = ?", (ANYUE,)
            ),
            "ours": sender.store.db.one("SELECT ack FROM in_batches WHERE sender = ?", (ANYUE,)),
        }
        received = sender.store.db.all(
            "SELECT lines, claimed_fen, accepted_claim_fen FROM in_batches WHERE sender = ?",
            (ANYUE,),
        )
    assert fares, "the previous release's signed fare rules were stored here"
    # Both formats really crossed: the previous release's ack names no purpose, ours does.
    assert acks["theirs"] and '"purpose"' not in acks["theirs"][0]
    assert acks["ours"] and '"purpose":"batch-acknowledgement"' in acks["ours"][0]
    [(lines, claimed, accepted)] = received
    assert lines >= 10 and accepted == claimed > 0

    # The previous release proposes too; this release answers, and it agrees as well.
    confirmed = await asyncio.to_thread(
        previous_release.cli,
        previous_tree,
        "settle",
        "confirm",
        "--config",
        str(anyue.config_path),
        "--period",
        period.isoformat(),
    )
    assert "settled" in confirmed.stdout
    assert ours.receivable_fen == sent.accepted_claim_fen and ours.payable_fen == accepted
