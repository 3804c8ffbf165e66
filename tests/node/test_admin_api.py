"""CardAdmin.SetCardStatus (broker/node/admin_api.py) on a running node: the back office's
own admins only, card numbers as data, never echoed or logged, and the change pushed on."""

from __future__ import annotations

from collections.abc import MutableMapping
from datetime import datetime, timedelta
from typing import Any

import grpc
import pytest
import structlog
from google.protobuf.timestamp_pb2 import Timestamp
from structlog.testing import capture_logs

from broker._proto.yikatong.v1 import admin_pb2, admin_pb2_grpc, types_pb2
from broker.cards import status_log
from broker.cards.registry import Registry
from broker.trust import certops
from broker.trust.identity import admin_identity, operator_identity
from tests.conftest import ANYUE, DAZU, Cluster
from tests.helpers import caller_channel, node_channel


def request(numbers: list[str], status: int = types_pb2.CARD_STATUS_LOST) -> Any:
    return admin_pb2.SetCardStatusRequest(card_numbers=numbers, status=status)  # type: ignore[arg-type]


async def call(ch: grpc.aio.Channel, req: Any) -> Any:
    try:
        return await admin_pb2_grpc.CardAdminStub(ch).SetCardStatus(req, timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc
    finally:
        await ch.close()


def admin(cluster: Cluster, now: datetime) -> grpc.aio.Channel:
    dazu = cluster.setups[DAZU]
    ca = certops.active_ca(dazu.paths)
    return caller_channel(cluster.nodes[DAZU].address, dazu, ca, admin_identity(DAZU, "ops-1"), now)


def active_numbers(cluster: Cluster, n: int) -> list[str]:
    return [c.ref.card_number for c in cluster.setups[DAZU].cards if c.status == "active"][:n]


async def test_an_admin_reports_cards_lost_and_the_change_is_logged_for_peers(
    cluster: Cluster, now: datetime
):
    numbers = active_numbers(cluster, 2)
    before = status_log.head(cluster.nodes[DAZU].registry.db).seq
    saved = structlog.get_config()
    structlog.reset_defaults()
    try:
        with capture_logs() as events:
            got = await call(admin(cluster, now), request([numbers[0], "NOSUCH0001", numbers[1]]))
    finally:
        structlog.configure(**saved)
    assert isinstance(got, admin_pb2.SetCardStatusResponse), got
    assert (got.changed, got.unchanged, list(got.unknown)) == (2, 0, [2])
    assert (got.first_seq, got.last_seq) == (before + 1, before + 2)
    reg = Registry(cluster.setups[DAZU].config.registry)
    try:
        assert all(reg.lookup(n).status == "lost" for n in numbers)  # type: ignore[union-attr]
    finally:
        reg.close()
    logged: list[MutableMapping[str, Any]] = [e for e in events if e["event"] == "card_status_set"]
    assert logged and logged[0]["caller"] == f"spiffe://{DAZU}.yikatong.cy/admin/ops-1"
    assert not any(n in repr(events) for n in [*numbers, "NOSUCH0001"])


async def test_only_this_districts_admins_may_call_it(cluster: Cluster, now: datetime):
    dazu = cluster.setups[DAZU]
    ca = certops.active_ca(dazu.paths)
    address = cluster.nodes[DAZU].address
    for ch in (
        caller_channel(address, dazu, ca, operator_identity(DAZU, "bus-01"), now),
        node_channel(address, dazu, cluster.setups[ANYUE]),  # a peer node
    ):
        got = await call(ch, request(active_numbers(cluster, 1)))
        assert isinstance(got, grpc.aio.AioRpcError)
        assert got.code() == grpc.StatusCode.PERMISSION_DENIED
    reg = Registry(dazu.config.registry)
    try:
        assert reg.lookup(active_numbers(cluster, 1)[0]).status == "active"  # type: ignore[union-attr]
    finally:
        reg.close()


def future(now: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(now + timedelta(hours=1))
    return ts


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda r, now: r.ClearField("card_numbers"), "card_numbers"),
        (lambda r, now: setattr(r, "status", types_pb2.CARD_STATUS_EXPIRED), "status"),
        (lambda r, now: setattr(r, "status", 42), "status"),
        (lambda r, now: r.changed_at.CopyFrom(future(now)), "changed_at"),
        (lambda r, now: setattr(r.changed_at, "nanos", -1), "changed_at.nanos"),
    ],
)
async def test_an_odd_request_is_invalid_argument_naming_the_field(
    cluster: Cluster, now: datetime, change: Any, field: str
):
    req = request(active_numbers(cluster, 1))
    change(req, now)
    got = await call(admin(cluster, now), req)
    assert isinstance(got, grpc.aio.AioRpcError)
    assert got.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (got.details() or "").startswith(field), got.details()
