"""Settlement.SubmitTrips over mutual TLS: per-trip outcomes, idempotence, conflicts; and the
intake process behind it: bodies it refuses, the node's clock, a killed worker, back-pressure."""

from __future__ import annotations

import asyncio
import os
import signal
from datetime import datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from broker._proto.yikatong.v1 import settlement_pb2, settlement_pb2_grpc, types_pb2
from broker.cards.model import Scene
from broker.settlement.ledger import SqliteLedger
from tests.conftest import ANYUE, DAZU, Cluster
from tests.helpers import channel, node_channel

OUT = settlement_pb2


def record(trip_id: str, now: datetime, **changes) -> settlement_pb2.TripRecord:
    ts = Timestamp()
    ts.FromDatetime(now - timedelta(minutes=3))
    fields: dict[str, Any] = dict(
        operator_id="transit-01",
        trip_id=trip_id,
        card=types_pb2.CardRef(issuer_region=ANYUE, card_number="C5120210000001"),
        scene=types_pb2.SCENE_BUS,
        occurred_at=ts,
        gross_fare_fen=200,
        charged_fen=0,
        concession_fen=200,
        applied_entitlement=types_pb2.ENTITLEMENT_SENIOR_65,
        fare_version="sample-1",
    )
    fields.update(changes)
    return settlement_pb2.TripRecord(**fields)


def operator_stub(cluster: Cluster) -> tuple[grpc.aio.Channel, settlement_pb2_grpc.SettlementStub]:
    s = cluster.setups[DAZU]
    ch = channel(
        cluster.nodes[DAZU].address,
        DAZU,
        s.paths.ca_cert.read_bytes(),
        s.operator_cert.read_bytes(),
        s.operator_key.read_bytes(),
    )
    return ch, settlement_pb2_grpc.SettlementStub(ch)


async def test_a_batch_keeps_its_good_lines_and_resubmission_is_idempotent(cluster: Cluster, now):
    ch, stub = operator_stub(cluster)
    try:
        batch = settlement_pb2.SubmitTripsRequest(
            trips=[
                record("t-1", now),
                record("t-2", now, charged_fen=50),
                record("t-3", now, card=types_pb2.CardRef(issuer_region=ANYUE, card_number="bad")),
                record("t-4", now, operator_id="someone-else"),
                record("t-5", now, fare_version="made-up"),
            ]
        )
        first = await stub.SubmitTrips(batch, timeout=10)
        got = [(r.trip_id, r.outcome, r.reason) for r in first.results]
        assert got == [
            ("t-1", OUT.TRIP_OUTCOME_ACCEPTED, "ok"),
            ("t-2", OUT.TRIP_OUTCOME_REJECTED, "bad_amounts"),
            ("t-3", OUT.TRIP_OUTCOME_REJECTED, "malformed"),
            ("t-4", OUT.TRIP_OUTCOME_REJECTED, "operator_mismatch"),
            ("t-5", OUT.TRIP_OUTCOME_REJECTED, "unknown_fare_version"),
        ]
        assert first.results[2].detail.startswith("trips[2].card.card_number:")
        again = await stub.SubmitTrips(batch, timeout=10)
        assert again == first
        assert cluster.nodes[DAZU].intake is not None
        changed = settlement_pb2.SubmitTripsRequest(trips=[record("t-1", now, place_id="r-9")])
        conflict = await stub.SubmitTrips(changed, timeout=10)
        assert conflict.results[0].outcome == OUT.TRIP_OUTCOME_CONFLICT
        asked = await stub.GetTripOutcomes(
            settlement_pb2.GetTripOutcomesRequest(
                operator_id="transit-01", trip_ids=["t-1", "t-2", "t-404"]
            ),
            timeout=10,
        )
        assert [r.outcome for r in asked.results] == [
            OUT.TRIP_OUTCOME_ACCEPTED,
            OUT.TRIP_OUTCOME_REJECTED,
            OUT.TRIP_OUTCOME_UNKNOWN,
        ]
    finally:
        await ch.close()


async def test_oversized_batches_and_peer_nodes_are_refused(cluster: Cluster, now):
    ch, stub = operator_stub(cluster)
    peer = node_channel(cluster.nodes[DAZU].address, cluster.setups[DAZU], cluster.setups[ANYUE])
    try:
        huge = settlement_pb2.SubmitTripsRequest(
            trips=[record(f"t-{i}", now) for i in range(10_001)]
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.SubmitTrips(huge, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("trips:")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await settlement_pb2_grpc.SettlementStub(peer).SubmitTrips(
                settlement_pb2.SubmitTripsRequest(trips=[record("t-1", now)]), timeout=10
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await ch.close()
        await peer.close()


def raw_submit(ch: grpc.aio.Channel) -> Any:
    """SubmitTrips with the body sent as given (bytes), the answer decoded."""
    return ch.unary_unary(
        "/yikatong.v1.Settlement/SubmitTrips",
        request_serializer=None,
        response_deserializer=settlement_pb2.SubmitTripsResponse.FromString,
    )


async def test_a_body_that_is_not_a_submit_trips_request_is_refused_naming_the_request(
    cluster: Cluster, now
):
    """The node passes SubmitTrips' bytes undecoded to its intake process, which refuses them."""
    ch, stub = operator_stub(cluster)
    submit = raw_submit(ch)
    try:
        for garbage in (b"\xff\xff\xff", b"\x0a\x03\x12\x01\xff"):  # truncated; bad UTF-8
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await submit(garbage, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details() == (
                "request: does not decode as yikatong.v1.SubmitTripsRequest"
            )
        ok = await stub.SubmitTrips(settlement_pb2.SubmitTripsRequest(trips=[record("g-1", now)]))
        assert [r.reason for r in ok.results] == ["ok"]  # the worker serves on
    finally:
        await ch.close()


async def test_the_node_clock_decides_too_late_and_in_future(cluster: Cluster, now):
    """The intake process judges at the node's clock (here a DayClock moved on), not its own."""
    ch, stub = operator_stub(cluster)
    try:
        cluster.clock.move_to(now + timedelta(hours=73))
        got = await stub.SubmitTrips(
            settlement_pb2.SubmitTripsRequest(
                trips=[record("late-1", now), record("soon-1", now + timedelta(hours=73))]
            ),
            timeout=10,
        )
        assert [r.reason for r in got.results] == ["too_late", "ok"]
    finally:
        await ch.close()


async def test_an_intake_process_killed_mid_request_fails_the_call_unavailable_and_loses_nothing(
    cluster: Cluster, now, tmp_path, monkeypatch
):
    """kill -9 of the intake process after its commit, before its answer: the operator gets
    UNAVAILABLE, the node serves on (gates too), and the resubmission gets every trip's stored
    outcome, each stored once."""
    release = tmp_path / "release"
    monkeypatch.setenv("YIKATONG_PAUSE_AT", "intake_recorded")  # the worker is spawned at
    monkeypatch.setenv("YIKATONG_PAUSE_FILE", str(release))  # the first request: it inherits
    ch, stub = operator_stub(cluster)
    node = cluster.nodes[DAZU]
    assert node.intake is not None
    try:
        batch = settlement_pb2.SubmitTripsRequest(
            trips=[record("k-1", now), record("k-2", now, charged_fen=50), record("k-3", now)]
        )
        call = asyncio.ensure_future(stub.SubmitTrips(batch, timeout=30))
        mark = release.with_name("release.reached")
        for _ in range(1000):
            if mark.exists():
                break
            await asyncio.sleep(0.02)
        pid = node.intake.worker_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "submit the trips again" in (info.value.details() or "")
        card = cluster.setups[ANYUE].cards[0].ref
        assert (await cluster.gate(DAZU).check(card, Scene.BUS)) is not None  # gates go on
        release.touch()
        again = await stub.SubmitTrips(batch, timeout=30)
        assert [r.reason for r in again.results] == ["ok", "bad_amounts", "ok"]
        assert node.intake.worker_pid not in (None, pid)
        path = cluster.setups[DAZU].config.ledger.path
        assert path is not None
        ledger = SqliteLedger(path)
        try:
            assert ledger.count() == 3
        finally:
            ledger.close()
    finally:
        release.touch()
        await ch.close()


async def test_uploads_beyond_the_intake_bound_are_refused_busy_with_a_retry_hint(
    cluster: Cluster, now, tmp_path, monkeypatch
):
    """While the intake process holds a request, full requests queue up to the bound (about
    four); the next one is refused RESOURCE_EXHAUSTED at once, and every queued one is served."""
    release = tmp_path / "release"
    monkeypatch.setenv("YIKATONG_PAUSE_AT", "intake_started")
    monkeypatch.setenv("YIKATONG_PAUSE_FILE", str(release))
    ch, stub = operator_stub(cluster)
    submit = raw_submit(ch)
    try:
        first = asyncio.ensure_future(
            stub.SubmitTrips(settlement_pb2.SubmitTripsRequest(trips=[record("b-0", now)]))
        )
        mark = release.with_name("release.reached")
        for _ in range(1000):
            if mark.exists():
                break
            await asyncio.sleep(0.02)
        full = [
            settlement_pb2.SubmitTripsRequest(
                trips=[record(f"b-{k}-{i}", now) for i in range(10_000)]
            ).SerializeToString()
            for k in range(8)
        ]
        queued = []
        refused = None
        for body in full:
            try:
                queued.append(asyncio.ensure_future(submit(body, timeout=120)))
                await asyncio.sleep(0.3)  # in the node's queue before the next is sent
                if queued[-1].done():
                    queued.pop().result()
            except grpc.aio.AioRpcError as exc:
                refused = exc
                break
        assert refused is not None, "no request was refused"
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry in 1 s" in (refused.details() or "")
        assert 3 <= len(queued) <= 6
        release.touch()
        assert [r.reason for r in (await first).results] == ["ok"]
        for call in queued:
            assert {r.reason for r in (await call).results} == {"ok"}
    finally:
        release.touch()
        await ch.close()
