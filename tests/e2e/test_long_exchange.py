"""Long exchanges finish although connections are aged; a revoked caller's stream does not.

The nodes here age connections after 2 s (``tls.max_connection_age_s``). The
server then sends GOAWAY: calls already running on the connection may go on
for the grace (as long as an exchange's timeout), and new calls go to a new
connection. Before, the grace was 10 s, so a stream was cut at about 12 s; the
200,000-line exchange below is paced to stream for longer than that.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.node.server import Node
from broker.testbed import build as testbed
from broker.testbed.clock import DayClock
from broker.trust import certops
from tests.conftest import ANYUE, DAZU, THREE, Cluster
from tests.e2e.raw_batches import (
    Feed,
    batch,
    lines_for,
    new_spool_file,
    no_spool_file_left,
    spool_files,
)
from tests.e2e.test_clearing_checks import dazu_signer, publish_dazu_fares

# Only the exchanges: every node also follows its peers (WatchStatus streams).
EXCHANGE = "/yikatong.v1.Settlement/ExchangeBatch"

AGE_S = 2
OLD_CUT_S = AGE_S * 1.1 + 10  # the age (gRPC adds up to 10 % jitter) plus the old 10 s grace
LINES = 200_000


@pytest.fixture
async def aged(tmp_path: Path, now: datetime) -> AsyncIterator[Cluster]:
    setups = testbed.build(
        tmp_path,
        THREE,
        now,
        cards_per_district=60,
        bundle_refresh_s=1,
        max_connection_age_s=AGE_S,
    )
    clock = DayClock()
    nodes = {code: await Node.start(s.config, clock) for code, s in setups.items()}
    c = Cluster(setups, nodes, clock)
    try:
        yield c
    finally:
        await c.close()


def connections_to(port: int) -> int:
    """Established TCP connections to ``port`` on this host, counted at their client ends."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


async def test_a_200000_line_exchange_outlives_the_connection_age(aged: Cluster, now: datetime):
    await publish_dazu_fares(aged)
    when = now - timedelta(minutes=5)
    parts = batch(lines_for(aged, LINES, when), dazu_signer(aged), when, 1)
    chunks, trailer = parts[:-1], parts[-1]
    pace = (OLD_CUT_S + 2) / len(chunks)  # the stream lasts well past the old cut
    anyue = aged.nodes[ANYUE]
    feed = Feed(aged, timeout=120)
    started = time.monotonic()
    goaway_checked = False
    try:
        for i, chunk in enumerate(chunks):
            feed.send(chunk)
            await asyncio.sleep(max(0.0, started + (i + 1) * pace - time.monotonic()))
            if not goaway_checked and time.monotonic() > started + AGE_S * 2:
                # The connection has had its GOAWAY: a new call on the same channel succeeds,
                # on a new connection, while the exchange goes on over the old one.
                reply = await health_pb2_grpc.HealthStub(feed.channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                assert connections_to(anyue.port) >= 2
                goaway_checked = True
        feed.send(trailer)
        feed.end()
        replies = await feed.replies()
        elapsed = time.monotonic() - started
    finally:
        await feed.close()
    assert goaway_checked
    assert elapsed > OLD_CUT_S, elapsed
    ack = replies[-1].ack.document
    assert f'"lines":{LINES}'.encode() in ack and f'"accepted":{LINES}'.encode() in ack, ack[:300]


def serial_of(path: Path) -> str:
    return f"{x509.load_pem_x509_certificate(path.read_bytes()).serial_number:x}"


async def test_a_revoked_callers_stream_is_ended_at_the_trust_change(aged: Cluster, now: datetime):
    dazu = aged.setups[DAZU]
    guard = aged.nodes[ANYUE].guard
    assert guard is not None
    parts = batch(lines_for(aged, 4, now - timedelta(minutes=5)), dazu_signer(aged), now, 1, 2)
    before = spool_files()
    feed = Feed(aged, timeout=60)
    try:
        feed.send(parts[0])  # the stream is open and spooling; its caller is then revoked
        await new_spool_file(before)
        assert guard.streams.count(EXCHANGE) == 1
        certops.revoke(dazu.paths, serial_of(dazu.paths.node_cert), now)
        started = time.monotonic()
        err = await feed.refusal()  # Anyue fetches Dazu's bundle every second, then reloads
        assert time.monotonic() - started < 10
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        details = err.details() or ""
        assert "has been revoked" in details and "ended at a trust change" in details, details
        await no_spool_file_left(before)
        assert guard.streams.count(EXCHANGE) == 0
    finally:
        await feed.close()
