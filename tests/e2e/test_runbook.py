"""docs/operations.md, as written: its marked blocks set up two neighbours, who then work.

The runbook's own blocks — first setup, starting the node, adding a neighbour,
routine renewal, closing a settlement day and an operator losing access — are
read from the file (tests/runbook.py) and run unchanged, for Dazu and its
neighbour Anyue, each in a temp directory of its own with the variables the
runbook names (``DIR``, ``DISTRICT``, ``CONFIG``, ``PEER`` …); its ``node.toml``
and ``fares.toml`` are written as shown but for the two network addresses
(and, for Anyue, the two codes swapped), as the runbook says. ``broker serve``
runs as a background process. Between the blocks the test does what the
runbook leaves to people: it hands the bundle files over, writes the registry
import file, and is Dazu's bus operator (gate checks, the day's trip).

Not here: the distrusted-operator-key and compromised-node-key procedures
(tests/cli/test_certs.py), CA rotation (tests/e2e/test_rotation.py), and what
needs a second machine or a timer (copying files to a node, systemd units).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from broker._proto.yikatong.v1 import gate_pb2, settlement_pb2, settlement_pb2_grpc, types_pb2
from broker.cards.gb11643 import ssn_check_character
from broker.cards.model import CardRef, Scene, shanghai_day
from broker.settlement.days import day_end, window_end
from broker.testbed.build import free_port
from broker.testbed.operator_client import GateClient, open_channel
from broker.trust.config import node_server_name
from tests.conftest import unavailable
from tests.runbook import (
    ProcessClock,
    blocks,
    faketime_library,
    file_block,
    run_block,
    start_block,
    stop_block,
)

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
DAZU, ANYUE = "500111", "512021"
OPERATOR = "bus-01"  # the operator the first-setup block issues
# The runbook's example addresses, which the test replaces with free loopback ports.
LISTEN = 'listen = "0.0.0.0:50111"'
PEER_ADDRESS = 'address = "anyue-node.example:50111"'
INTAKE = 'intake_listen = "0.0.0.0:50112"'

# What each procedure's marked blocks are; a marker lost in an edit fails here.
PROCEDURES = {
    "first-setup": 2,
    "serve": 1,
    "adding-a-neighbour": 2,
    "routine-renewal": 1,
    "settlement-closing": 3,
    "operator-loses-access": 1,
}


@dataclass(frozen=True)
class District:
    code: str
    peer: str
    home: Path
    port: int
    clock: ProcessClock

    @property
    def env(self) -> dict[str, str]:
        """The runbook's variables, pointed into this district's temp directory."""
        return {
            "DIR": str(self.home / "certs"),
            "DISTRICT": self.code,
            "CONFIG": str(self.home / "node.toml"),
            "PEER": self.peer,
            **self.clock.env,
        }

    @property
    def certs(self) -> Path:
        return self.home / "certs" / self.code


def run(name: str, step: int, d: District, **extra: str) -> tuple[str, str]:
    """Run block ``step`` of procedure ``name`` for district ``d``; its stdout and stderr."""
    text = blocks(OPERATIONS, name)[step]
    done = run_block(text, {**d.env, **extra}, cwd=d.home, timeout=60)
    assert done.returncode == 0, (
        f"runbook block {name}[{step}] failed at {d.code} (exit {done.returncode}):\n"
        f"{text}--- stdout\n{done.stdout}--- stderr\n{done.stderr}"
    )
    return done.stdout, done.stderr


def swap(text: str, a: str, b: str) -> str:
    return text.replace(a, "\0").replace(b, a).replace("\0", b)


def runbook_file(name: str, d: District, peer_port: int) -> str:
    """A file the runbook shows, as the runbook says the test writes it for ``d``."""
    text = file_block(OPERATIONS, name)
    if d.code == ANYUE:
        text = swap(text, DAZU, ANYUE)
    for example, real in (
        (LISTEN, f'listen = "127.0.0.1:{d.port}"'),
        (PEER_ADDRESS, f'address = "127.0.0.1:{peer_port}"'),
        (INTAKE, f'intake_listen = "127.0.0.1:{free_port()}"'),
    ):
        if name == "node.toml":
            assert text.count(example) == 1, f"the runbook's node.toml no longer has {example}"
            text = text.replace(example, real)
    return text


def cards_csv(code: str) -> str:
    """One active card-holder born in 1950: senior entitlements, a free bus ride at Dazu."""
    first = f"{code}19500101123"
    ssn = first + ssn_check_character(first)
    return (
        "card_number,ssn,status,disabled,student,valid_until\n"
        f"RB{code}0001,{ssn},active,false,false,2035-01-01\n"
    )


@contextmanager
def serving(d: District) -> Iterator[Path]:
    """The runbook's serve block in the background; it must stop cleanly on SIGTERM."""
    log = d.home / "serve.log"
    with log.open("wb") as out:
        proc = start_block(blocks(OPERATIONS, "serve")[0], d.env, d.home, out)
        try:
            yield log
        finally:
            code = stop_block(proc)
    assert code == 0, f"broker serve at {d.code} exited {code}:\n{log.read_text()}"


def operator_channel(d: District) -> grpc.aio.Channel:
    """The district's bus operator's channel to its node, with the files first setup issued."""
    return open_channel(
        f"127.0.0.1:{d.port}",
        node_server_name(d.code),
        d.certs / "ca.pem",
        d.certs / "operators" / f"{OPERATOR}.pem",
        d.certs / "operators" / f"{OPERATOR}.key",
    )


async def until_a_peer_answers(client: GateClient, card: CardRef) -> gate_pb2.GateDecision:
    """Check ``card`` until its home district answers (both nodes up, bundles taken up)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            d = await client.check(card, Scene.BUS)
            if d.source == types_pb2.DECISION_SOURCE_PEER:
                return d
        except grpc.aio.AioRpcError:
            pass
        assert time.monotonic() < deadline, f"{card.issuer_region} never answered over the peering"
        await asyncio.sleep(0.2)


async def recognise_and_ride(dazu: District, anyue: District) -> str:
    """Each district's bus checks the other's card; Dazu's uploads the ride. The day's PERIOD."""
    at_dazu, at_anyue = operator_channel(dazu), operator_channel(anyue)
    try:
        ride = await until_a_peer_answers(
            GateClient(at_dazu, OPERATOR), CardRef(ANYUE, f"RB{ANYUE}0001")
        )
        await until_a_peer_answers(GateClient(at_anyue, OPERATOR), CardRef(DAZU, f"RB{DAZU}0001"))
        assert ride.allow and ride.concession_fen == 200 and ride.charged_fen == 0  # senior_65
        when = datetime.now(UTC)  # the ride: after the import made the card ACTIVE
        occurred = Timestamp()
        occurred.FromDatetime(when)
        trip = settlement_pb2.TripRecord(
            operator_id=OPERATOR,
            trip_id="runbook-1",
            card=types_pb2.CardRef(issuer_region=ANYUE, card_number=f"RB{ANYUE}0001"),
            scene=types_pb2.SCENE_BUS,
            occurred_at=occurred,
            gross_fare_fen=ride.gross_fare_fen,
            charged_fen=ride.charged_fen,
            concession_fen=ride.concession_fen,
            applied_entitlement=ride.applied_entitlement,
            fare_version=ride.fare_version,
        )
        stub = settlement_pb2_grpc.SettlementStub(at_dazu)
        done = await stub.SubmitTrips(settlement_pb2.SubmitTripsRequest(trips=[trip]), timeout=10)
        assert [r.outcome for r in done.results] == [settlement_pb2.TRIP_OUTCOME_ACCEPTED]
        return shanghai_day(when).isoformat()
    finally:
        await at_dazu.close()
        await at_anyue.close()


async def refused_within(d: District, card: CardRef, seconds: float) -> None:
    ch = operator_channel(d)
    client = GateClient(ch, OPERATOR)
    try:
        deadline = time.monotonic() + seconds
        while True:
            try:
                await client.check(card, Scene.BUS)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.PERMISSION_DENIED
                return
            assert time.monotonic() < deadline, f"still served {seconds} s after the revocation"
            await asyncio.sleep(0.2)
    finally:
        await ch.close()


@pytest.fixture
def process_clock(tmp_path: Path) -> ProcessClock:
    library = faketime_library()
    if library is None:
        unavailable("libfaketime is not installed (apt-get install faketime)")
    assert library is not None
    return ProcessClock(library, tmp_path / "faketime")


def test_the_runbooks_procedures_run_as_written_for_two_neighbours(
    tmp_path: Path, process_clock: ProcessClock
):
    assert {name: len(blocks(OPERATIONS, name)) for name in PROCEDURES} == PROCEDURES
    dazu = District(DAZU, ANYUE, tmp_path / DAZU, free_port(), process_clock)
    anyue = District(ANYUE, DAZU, tmp_path / ANYUE, free_port(), process_clock)
    pair = (dazu, anyue)
    other = {DAZU: anyue, ANYUE: dazu}

    # First setup: certificates, node.toml and fares.toml, the registry, then serve.
    for d in pair:
        d.home.mkdir()
        run("first-setup", 0, d)
        for name in ("node.toml", "fares.toml"):
            (d.home / name).write_text(runbook_file(name, d, other[d.code].port))
        (d.home / "cards.csv").write_text(cards_csv(d.code))
        out, _ = run("first-setup", 1, d)
        assert "imported 1 rows" in out
    with ExitStack() as nodes:
        for d in pair:
            nodes.enter_context(serving(d))

        # Adding a neighbour, on running nodes: [[peers]] is in node.toml from the start.
        exported = {d.code: run("adding-a-neighbour", 0, d)[1] for d in pair}
        for d in pair:
            name = f"{d.peer}.bundle.json"
            shutil.copy(other[d.code].home / name, d.home / name)  # mail, USB, ...
        for d in pair:
            out, _ = run("adding-a-neighbour", 1, d)
            read_out = [ln for ln in exported[d.peer].splitlines() if "fingerprint" in ln]
            shown = [ln for ln in out.splitlines() if "fingerprint" in ln]
            assert read_out and shown == read_out  # what is compared by phone, verbatim
            assert f"bundle 1 of {d.peer} stored" in out and f"{d.peer}: held 1" in out

        period = asyncio.run(recognise_and_ride(dazu, anyue))

        for d in pair:
            out, _ = run("routine-renewal", 0, d)
            assert "0 certificate(s) renewed" in out  # a fresh district: nothing due

        # The processes' clock (libfaketime) moves to the next morning, then past the window.
        day = date.fromisoformat(period)
        process_clock.move_to(day_end(day) + timedelta(minutes=1))
        for d in pair:  # Dazu sends its batch; Anyue has nothing of Dazu's to send
            out, _ = run("settlement-closing", 0, d, PERIOD=period)
            assert (ANYUE in out) if d is dazu else ("nothing new to send" in out)
        process_clock.move_to(window_end(day) + timedelta(minutes=1))
        for d in pair:  # the sealing close: nothing new on either side
            out, _ = run("settlement-closing", 1, d, PERIOD=period)
            assert "nothing new to send" in out, out
        for d in pair:
            out, _ = run("settlement-closing", 2, d, PERIOD=period)
            assert "settled" in out, out
        out, _ = run("settlement-closing", 2, dazu, PERIOD=period)
        assert "2.00" in out  # the free ride Anyue reimburses: 200 fen, agreed both sides

        run("operator-loses-access", 0, dazu, OPERATOR=OPERATOR)
        asyncio.run(refused_within(dazu, CardRef(DAZU, f"RB{DAZU}0001"), 5))
