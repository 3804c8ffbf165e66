"""Settlement's servicer (broker/node/settlement_api.py): the checks it makes before the domain.

tests/e2e/test_settlement.py covers per-trip outcomes, idempotence, conflicts, an oversized
SubmitTrips and peer nodes refused; tests/e2e/test_clearing*.py the exchanges themselves.
Here, through a running node: trip outcomes per operator and their bounds, the statement's
period, the stream rules of ExchangeBatch and incomplete signed documents; and on the servicer
alone, a node that does not clear.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from broker._proto.yikatong.v1 import settlement_pb2, settlement_pb2_grpc, types_pb2
from broker.core.errors import ConfigError, InvalidArgument
from broker.node.settlement_api import SettlementServicer
from broker.settlement.intake import MAX_TRIPS_PER_REQUEST, IntakeSpec, TripIntake
from broker.trust import certops
from broker.trust.identity import bind_identity, node_identity, operator_identity, unbind_identity
from tests.conftest import ANYUE, DAZU, Cluster
from tests.helpers import caller_channel, channel, node_channel

OUT = settlement_pb2
NO_CONTEXT = cast(Any, None)  # the servicer's methods do not use their context


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


def outcomes_of(operator_id: str, *trip_ids: str) -> settlement_pb2.GetTripOutcomesRequest:
    return settlement_pb2.GetTripOutcomesRequest(operator_id=operator_id, trip_ids=list(trip_ids))


async def test_trip_outcomes_are_per_operator_in_order_and_unknown_ids_are_unknown(
    cluster: Cluster, now: datetime
) -> None:
    ch, stub = operator_stub(cluster)
    dazu = cluster.setups[DAZU]
    museum = caller_channel(
        cluster.nodes[DAZU].address,
        dazu,
        certops.active_ca(dazu.paths),
        operator_identity(DAZU, "museum-02"),
        now,
    )
    try:
        empty = await stub.SubmitTrips(settlement_pb2.SubmitTripsRequest(), timeout=5)
        assert list(empty.results) == []
        sent = await stub.SubmitTrips(
            settlement_pb2.SubmitTripsRequest(trips=[trip("a-1", now)]), timeout=5
        )
        assert sent.results[0].outcome == OUT.TRIP_OUTCOME_ACCEPTED

        asked = await stub.GetTripOutcomes(
            outcomes_of("transit-01", "nope-1", "a-1", "nope-2", "a-1", ""), timeout=5
        )
        assert [(r.trip_id, r.outcome) for r in asked.results] == [
            ("nope-1", OUT.TRIP_OUTCOME_UNKNOWN),
            ("a-1", OUT.TRIP_OUTCOME_ACCEPTED),
            ("nope-2", OUT.TRIP_OUTCOME_UNKNOWN),
            ("a-1", OUT.TRIP_OUTCOME_ACCEPTED),
            ("", OUT.TRIP_OUTCOME_UNKNOWN),
        ]
        assert {r.reason for r in asked.results if r.outcome == OUT.TRIP_OUTCOME_UNKNOWN} == {
            "unknown"
        }
        none = await stub.GetTripOutcomes(outcomes_of("transit-01"), timeout=5)
        assert list(none.results) == []

        # Another operator of the district does not see transit-01's trip under the same id.
        theirs = await settlement_pb2_grpc.SettlementStub(museum).GetTripOutcomes(
            outcomes_of("museum-02", "a-1"), timeout=5
        )
        assert [r.outcome for r in theirs.results] == [OUT.TRIP_OUTCOME_UNKNOWN]
        with pytest.raises(grpc.aio.AioRpcError) as other:
            await stub.GetTripOutcomes(outcomes_of("museum-02", "a-1"), timeout=5)
        assert other.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await ch.close()
        await museum.close()


async def test_trip_outcomes_take_at_most_the_request_limit(cluster: Cluster) -> None:
    ch, stub = operator_stub(cluster)
    try:
        ids = [f"t-{i}" for i in range(MAX_TRIPS_PER_REQUEST)]
        full = await stub.GetTripOutcomes(outcomes_of("transit-01", *ids), timeout=30)
        assert len(full.results) == MAX_TRIPS_PER_REQUEST
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetTripOutcomes(outcomes_of("transit-01", *ids, "one-more"), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (info.value.details() or "").startswith("trip_ids:")
    finally:
        await ch.close()


async def test_a_statement_needs_a_calendar_day(cluster: Cluster, now: datetime) -> None:
    ch, stub = operator_stub(cluster)
    try:
        day = now.date().isoformat()
        st = await stub.GetStatement(
            settlement_pb2.GetStatementRequest(operator_id="transit-01", period=day), timeout=5
        )
        assert (st.operator_id, st.period) == ("transit-01", day)
        assert sum(line.trips for line in st.lines) == 0  # nothing was submitted
        for bad in ["", "2026-11", "2026-13-01", "2026-02-30", "yesterday"]:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetStatement(
                    settlement_pb2.GetStatementRequest(operator_id="transit-01", period=bad),
                    timeout=5,
                )
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
            assert (info.value.details() or "").startswith("period:"), bad
    finally:
        await ch.close()


SIGNED = settlement_pb2.SignedDocument(document=b"{}", key_id="k1", signature=b"s")


async def test_peer_calls_refuse_a_broken_stream_or_an_incomplete_document(
    cluster: Cluster,
) -> None:
    ch = node_channel(cluster.nodes[DAZU].address, cluster.setups[DAZU], cluster.setups[ANYUE])
    stub = settlement_pb2_grpc.SettlementStub(ch)

    async def exchange(*parts: settlement_pb2.BatchPart) -> grpc.aio.AioRpcError:
        async def send() -> AsyncIterator[settlement_pb2.BatchPart]:
            for p in parts:
                yield p

        with pytest.raises(grpc.aio.AioRpcError) as info:
            _ = [a async for a in stub.ExchangeBatch(send(), timeout=5)]
        return info.value

    try:
        cases = [
            (await exchange(), "trailer:"),  # nothing at all
            (await exchange(OUT.BatchPart(lines=b"\n\x00")), "trailer:"),  # a line, no trailer
            (await exchange(OUT.BatchPart(trailer=SIGNED), OUT.BatchPart(lines=b"x")), "parts:"),
            # framing that does not hold together is refused as it arrives, before the trailer
            (await exchange(OUT.BatchPart(lines=b"x")), "a chunk of lines does not parse"),
            (
                await exchange(
                    OUT.BatchPart(trailer=OUT.SignedDocument(document=b"{}", key_id="k1"))
                ),
                "document:",
            ),
        ]
        for err, prefix in cases:
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, prefix
            assert (err.details() or "").startswith(prefix), (prefix, err.details())
        for call in (stub.PublishFares, stub.ConfirmDay):
            for doc in (
                OUT.SignedDocument(),
                OUT.SignedDocument(key_id="k1", signature=b"s"),
                OUT.SignedDocument(document=b"{}", signature=b"s"),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call(doc, timeout=5)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert (info.value.details() or "").startswith("document:")
    finally:
        await ch.close()


@pytest.fixture
def no_clearing(tmp_path: Path) -> Iterator[SettlementServicer]:
    """The servicer of a node with a ledger but no settlement key (it takes trips only)."""
    spec = IntakeSpec(tmp_path / "ledger.sqlite3", None, "yikatong", frozenset({DAZU}), None)
    intake = TripIntake(spec, datetime.now)
    yield SettlementServicer(intake, None)
    intake.close()


async def test_a_node_that_does_not_clear_says_so_for_every_clearing_call(
    no_clearing: SettlementServicer,
) -> None:
    async def no_parts() -> AsyncIterator[settlement_pb2.BatchPart]:
        yield OUT.BatchPart(trailer=SIGNED)

    token = bind_identity(operator_identity(DAZU, "transit-01"))
    try:
        with pytest.raises(ConfigError, match="does not clear"):
            await no_clearing.GetStatement(
                OUT.GetStatementRequest(operator_id="transit-01", period="2026-11-02"), NO_CONTEXT
            )
        with pytest.raises(InvalidArgument):  # the period is checked before the service
            await no_clearing.GetStatement(
                OUT.GetStatementRequest(operator_id="transit-01", period="x"), NO_CONTEXT
            )
        answer = await no_clearing.GetTripOutcomes(outcomes_of("transit-01", "z"), NO_CONTEXT)
        taken = OUT.SubmitTripsResponse.FromString(answer)  # encoded by the intake's worker
        assert [r.outcome for r in taken.results] == [OUT.TRIP_OUTCOME_UNKNOWN]
    finally:
        unbind_identity(token)
    token = bind_identity(node_identity(ANYUE))
    try:
        with pytest.raises(ConfigError, match="does not clear"):
            await no_clearing.PublishFares(SIGNED, NO_CONTEXT)
        with pytest.raises(ConfigError, match="does not clear"):
            await no_clearing.ConfirmDay(SIGNED, NO_CONTEXT)
        with pytest.raises(ConfigError, match="does not clear"):
            _ = [a async for a in no_clearing.ExchangeBatch(no_parts(), NO_CONTEXT)]
    finally:
        unbind_identity(token)
