"""Settlement.SubmitTrips over mutual TLS: per-trip outcomes, idempotence, conflicts."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from broker._proto.yikatong.v1 import settlement_pb2, settlement_pb2_grpc, types_pb2
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
