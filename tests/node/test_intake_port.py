"""The intake port (broker/node/intake_port.py): trips uploaded to the intake's worker process.

A real node started with an intake address (``intake_listen``), real mutual TLS, a real
worker process and ledger: operators upload there and read outcomes on either
port; the port refuses whom the node refuses (peers, another operator's
outcomes, unknown CAs, revoked certificates); a worker that dies is replaced
and serves the port again; an address that cannot be opened fails the start.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from google.protobuf.timestamp_pb2 import Timestamp

from broker._proto.yikatong.v1 import settlement_pb2, settlement_pb2_grpc, types_pb2
from broker.core.errors import ConfigError
from broker.node import server as node_server
from broker.node.server import Node
from broker.testbed.build import DistrictSetup, build
from broker.trust import certops, pki
from broker.trust.identity import operator_identity
from tests.conftest import ANYUE, DAZU
from tests.helpers import channel, node_channel

OUT = settlement_pb2
SUBMIT = "/yikatong.v1.Settlement/SubmitTrips"


def trip(trip_id: str, now: datetime) -> settlement_pb2.TripRecord:
    ts = Timestamp()
    ts.FromDatetime(now - timedelta(minutes=3))
    return settlement_pb2.TripRecord(
        operator_id="transit-01",
        trip_id=trip_id,
        card=types_pb2.CardRef(issuer_region=ANYUE, card_number="C5120210000001"),
        scene=types_pb2.SCENE_BUS,
        occurred_at=ts,
        gross_fare_fen=200,
        charged_fen=200,
        fare_version="sample-1",
    )


async def start(setup: DistrictSetup, listen: str = "127.0.0.1:0") -> Node:
    """``setup``'s node with an intake port, re-reading trust files every 200 ms."""
    cfg = replace(setup.config, tls=replace(setup.config.tls, reload_interval_ms=200))
    return await Node.start(cfg, intake_listen=listen)


@pytest.fixture
def setups(tmp_path: Path, now: datetime) -> dict[str, DistrictSetup]:
    return build(tmp_path, (DAZU, ANYUE), now, cards_per_district=20)


@pytest.fixture
async def node(setups: dict[str, DistrictSetup]) -> AsyncIterator[Node]:
    started = await start(setups[DAZU])
    try:
        yield started
    finally:
        await started.stop(grace=0.2)


def operator_channel(address: str, s: DistrictSetup) -> grpc.aio.Channel:
    return channel(
        address,
        DAZU,
        s.paths.ca_cert.read_bytes(),
        s.operator_cert.read_bytes(),
        s.operator_key.read_bytes(),
    )


def port_of(node: Node) -> str:
    address = node.intake_address
    assert address is not None
    return address


async def test_operators_upload_to_the_intake_port_and_the_node_never_receives_the_bytes(
    node: Node, setups: dict[str, DistrictSetup], now: datetime
) -> None:
    """Trips sent to the intake port are recorded in the node's ledger (their outcomes are
    read on either port), and the node's own process served no SubmitTrips."""
    dazu = setups[DAZU]
    assert port_of(node) != node.address
    port_ch = operator_channel(port_of(node), dazu)
    node_ch = operator_channel(node.address, dazu)
    try:
        to_port = settlement_pb2_grpc.SettlementStub(port_ch)
        to_node = settlement_pb2_grpc.SettlementStub(node_ch)
        sent = await to_port.SubmitTrips(
            OUT.SubmitTripsRequest(trips=[trip("p-1", now), trip("p-2", now)]), timeout=10
        )
        assert [r.outcome for r in sent.results] == [OUT.TRIP_OUTCOME_ACCEPTED] * 2
        assert len(node.metrics.by_method[SUBMIT]) == 0  # not through the node's process

        asked = await to_node.GetTripOutcomes(
            OUT.GetTripOutcomesRequest(operator_id="transit-01", trip_ids=["p-2", "x"]), timeout=10
        )
        assert [r.outcome for r in asked.results] == [
            OUT.TRIP_OUTCOME_ACCEPTED,
            OUT.TRIP_OUTCOME_UNKNOWN,
        ]
        # The node's port still takes uploads, into the same ledger, behind the same desk.
        await to_node.SubmitTrips(OUT.SubmitTripsRequest(trips=[trip("n-1", now)]), timeout=10)
        assert len(node.metrics.by_method[SUBMIT]) == 1
        again = await to_port.SubmitTrips(OUT.SubmitTripsRequest(trips=[trip("n-1", now)]))
        assert again.results[0].outcome == OUT.TRIP_OUTCOME_ACCEPTED  # its stored outcome
        seen = await to_port.GetTripOutcomes(
            OUT.GetTripOutcomesRequest(operator_id="transit-01", trip_ids=["n-1", "p-1"]),
            timeout=10,
        )
        assert [r.outcome for r in seen.results] == [OUT.TRIP_OUTCOME_ACCEPTED] * 2
    finally:
        await port_ch.close()
        await node_ch.close()


async def test_the_intake_port_refuses_whom_the_node_refuses(
    node: Node, setups: dict[str, DistrictSetup], now: datetime
) -> None:
    """A peer node is no operator; an operator reads only its own outcomes; a certificate of
    a CA this district does not trust gets no connection; clearing is not served there."""
    dazu, anyue = setups[DAZU], setups[ANYUE]
    peer_ch = node_channel(port_of(node), dazu, anyue)
    own_ch = operator_channel(port_of(node), dazu)
    stranger_ca = pki.create_ca(DAZU, now)  # the same district named, another key
    stranger = pki.issue(stranger_ca, operator_identity(DAZU, "transit-01"), now)
    stranger_ch = channel(
        port_of(node),
        DAZU,
        dazu.paths.ca_cert.read_bytes(),
        stranger.cert_pem(),
        stranger.key_pem(),
    )
    try:
        with pytest.raises(grpc.aio.AioRpcError) as peer:
            await settlement_pb2_grpc.SettlementStub(peer_ch).SubmitTrips(
                OUT.SubmitTripsRequest(trips=[trip("q-1", now)]), timeout=10
            )
        assert peer.value.code() == grpc.StatusCode.PERMISSION_DENIED

        own = settlement_pb2_grpc.SettlementStub(own_ch)
        with pytest.raises(grpc.aio.AioRpcError) as other:
            await own.GetTripOutcomes(
                OUT.GetTripOutcomesRequest(operator_id="museum-02", trip_ids=["q-1"]), timeout=10
            )
        assert other.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as statement:
            await own.GetStatement(
                OUT.GetStatementRequest(operator_id="transit-01", period="2026-11-01"), timeout=10
            )
        assert statement.value.code() == grpc.StatusCode.UNIMPLEMENTED

        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await settlement_pb2_grpc.SettlementStub(stranger_ch).SubmitTrips(
                OUT.SubmitTripsRequest(trips=[trip("q-2", now)]), timeout=10
            )
        assert unknown.value.code() == grpc.StatusCode.UNAVAILABLE  # no TLS session
    finally:
        for ch in (peer_ch, own_ch, stranger_ch):
            await ch.close()


async def test_a_revoked_operator_is_refused_at_the_intake_port_after_the_next_reload(
    node: Node, setups: dict[str, DistrictSetup], now: datetime
) -> None:
    """The worker re-reads the district's revocation list when it changes, as the node does."""
    dazu = setups[DAZU]
    ch = operator_channel(port_of(node), dazu)
    try:
        stub = settlement_pb2_grpc.SettlementStub(ch)
        await stub.SubmitTrips(OUT.SubmitTripsRequest(trips=[trip("r-1", now)]), timeout=10)
        cert = x509.load_pem_x509_certificate(dazu.operator_cert.read_bytes())
        certops.revoke(dazu.paths, f"{cert.serial_number:x}", now)
        for _ in range(100):  # reloaded within a reload interval (200 ms here)
            try:
                await stub.SubmitTrips(OUT.SubmitTripsRequest(trips=[trip("r-2", now)]), timeout=10)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "revoked" in (exc.details() or "")
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the revoked operator was still served after 10 s")
    finally:
        await ch.close()


async def test_a_worker_that_dies_is_replaced_and_serves_the_intake_port_again(
    setups: dict[str, DistrictSetup], now: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node_server, "INTAKE_CHECK_S", 0.2)
    node = await start(setups[DAZU])
    try:
        assert node.intake is not None
        first, pid = port_of(node), node.intake.worker_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            await asyncio.sleep(0.1)
            if node.intake.worker_pid not in (None, pid) and port_of(node) != first:
                break
        else:
            raise AssertionError("no new worker served the intake port within 10 s")
        ch = operator_channel(port_of(node), setups[DAZU])
        try:
            sent = await settlement_pb2_grpc.SettlementStub(ch).SubmitTrips(
                OUT.SubmitTripsRequest(trips=[trip("w-1", now)]), timeout=10
            )
            assert sent.results[0].outcome == OUT.TRIP_OUTCOME_ACCEPTED
        finally:
            await ch.close()
    finally:
        await node.stop(grace=0.2)


async def test_an_intake_address_that_cannot_be_opened_fails_the_start(
    setups: dict[str, DistrictSetup],
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(ConfigError, match=address):
            await start(setups[DAZU], address)
