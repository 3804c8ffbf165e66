"""A district node (broker/node/server.py): its gRPC options, start, health, port and stop."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker._proto.yikatong.v1 import settlement_pb2, settlement_pb2_grpc
from broker.core.errors import ConfigError
from broker.core.priority import in_background, keep_to
from broker.node.config import load_config
from broker.node.server import SERVICE_NAMES, SWITCH_INTERVAL_S, Node, server_options
from broker.peers.bundles import FAILURES_UNHEALTHY
from broker.settlement.clearing.sender import EXCHANGE_TIMEOUT_S
from broker.settlement.config import LedgerConfig, SettlementKeyConfig
from broker.testbed.build import DistrictSetup
from broker.trust.store import CRL_HEALTH, peer_health_name
from tests.conftest import ANYUE, DAZU, RONGCHANG, unavailable
from tests.helpers import channel

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
OUR_SERVICES = (
    "yikatong.v1.Gate",
    "yikatong.v1.Recognition",
    "yikatong.v1.Trust",
    "yikatong.v1.Settlement",
)

CONFIG = """
district = "500111"
listen = "127.0.0.1:0"
[tls]
ca_file = "ca.pem"
cert_file = "node.pem"
key_file = "node.key"
crl_file = "crl.pem"
{extra}
[registry]
path = "r.sqlite3"
[privacy]
hash_key_file = "hash.key"
"""


def options_for(tmp_path: Path, extra: str = "") -> dict[str, int]:
    path = tmp_path / "node.toml"
    path.write_text(CONFIG.format(extra=extra))
    return dict(server_options(load_config(path, env={})))


def test_server_options_recycle_connections_at_the_configured_age(tmp_path: Path) -> None:
    assert options_for(tmp_path, "max_connection_age_s = 42")["grpc.max_connection_age_ms"] == (
        42_000
    )
    assert options_for(tmp_path)["grpc.max_connection_age_ms"] == 300_000  # the default, 5 min


def test_server_options_refuse_to_share_the_port_and_bound_the_grace(tmp_path: Path) -> None:
    opts = options_for(tmp_path)
    assert opts["grpc.so_reuseport"] == 0  # a second node on the same port must fail, not share
    assert opts["grpc.max_connection_age_grace_ms"] > 0


def test_the_connection_age_grace_lets_an_exchange_running_at_the_goaway_finish(
    tmp_path: Path,
) -> None:
    """A stream started just before its connection's GOAWAY has its whole deadline left."""
    grace = options_for(tmp_path, "max_connection_age_s = 2")["grpc.max_connection_age_grace_ms"]
    assert grace >= EXCHANGE_TIMEOUT_S * 1000


def operator_channel(node: Node, setup: DistrictSetup) -> grpc.aio.Channel:
    return channel(
        node.address,
        setup.code,
        setup.paths.ca_cert.read_bytes(),
        setup.operator_cert.read_bytes(),
        setup.operator_key.read_bytes(),
    )


async def port_accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def test_a_started_node_serves_health_on_its_port_and_stop_closes_it(
    districts: dict[str, DistrictSetup],
) -> None:
    setup = districts[DAZU]
    assert set(OUR_SERVICES) <= set(SERVICE_NAMES)
    sys.setswitchinterval(0.005)  # the interpreter's default
    node = await Node.start(setup.config)
    # The loop takes the interpreter lock from the intake's threads after 0.5 ms, not 5.
    assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_S) == pytest.approx(0.0005)
    stopped = False
    ch = operator_channel(node, setup)
    try:
        configured_port = int(setup.config.listen.rsplit(":", 1)[1])
        assert node.port == configured_port and node.address == f"127.0.0.1:{configured_port}"
        assert await port_accepts(node.port)
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", *OUR_SERVICES):
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == SERVING, service
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Check(health_pb2.HealthCheckRequest(service="yikatong.v1.Nope"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert node.intake is not None and node.clearing is not None  # ledger and key configured
        await ch.close()
        await node.stop(grace=0.2)
        stopped = True
        assert not await port_accepts(node.port)
        answer = await node.health.Check(health_pb2.HealthCheckRequest(service=""), None)
        assert answer.status == NOT_SERVING
        assert node.supervisor.running() == []  # the background loops are cancelled
    finally:
        await ch.close()
        if not stopped:
            await node.stop(grace=0.2)


async def test_a_second_node_on_a_taken_port_is_a_config_error(
    districts: dict[str, DistrictSetup],
) -> None:
    cfg = replace(districts[DAZU].config, ledger=LedgerConfig(), settlement=SettlementKeyConfig())
    node = await Node.start(cfg)
    try:
        with pytest.raises(ConfigError, match=f"cannot listen on {cfg.listen}"):
            await Node.start(cfg)
        assert await port_accepts(node.port)  # the first node is unharmed
    finally:
        await node.stop(grace=0.2)


async def test_a_start_that_cannot_bind_closes_every_store_it_opened(
    districts: dict[str, DistrictSetup],
) -> None:
    """Found in review: the ledger and clearing stores stayed open after a failed start.

    The port is held by a plain socket, not another node: SQLite keeps a file's
    descriptors open while any connection of the process still has that file.
    """
    import socket

    cfg = districts[DAZU].config
    assert cfg.ledger.path is not None
    host, port = cfg.listen.rsplit(":", 1)
    squatter = socket.socket()
    squatter.bind((host, int(port)))
    squatter.listen()

    def open_files() -> int:
        fds = Path("/proc/self/fd")
        stores = {cfg.ledger.path, cfg.registry.path}
        return sum(1 for fd in fds.iterdir() if _target(fd) in stores)

    try:
        with pytest.raises(ConfigError, match="cannot listen on"):
            await Node.start(cfg)
        assert open_files() == 0
    finally:
        squatter.close()


def _target(fd: Path) -> Path | None:
    try:
        return Path(os.readlink(fd))
    except OSError:
        return None


async def test_without_a_ledger_the_settlement_service_is_not_served(
    districts: dict[str, DistrictSetup],
) -> None:
    setup = districts[DAZU]
    cfg = replace(setup.config, ledger=LedgerConfig(), listen="127.0.0.1:0")
    node = await Node.start(cfg)
    ch = operator_channel(node, setup)
    try:
        assert node.port != 0  # port 0 asks for any free port; the bound one is reported
        assert node.intake is None and node.clearing is None
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await settlement_pb2_grpc.SettlementStub(ch).SubmitTrips(
                settlement_pb2.SubmitTripsRequest(), timeout=5
            )
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await ch.close()
        await node.stop(grace=0.2)


async def test_health_turns_not_serving_while_the_nodes_own_certificate_is_expired(
    districts: dict[str, DistrictSetup],
) -> None:
    now = [datetime.now(UTC)]
    clock: Callable[[], datetime] = lambda: now[0]  # noqa: E731
    node = await Node.start(districts[DAZU].config, clock=clock)

    async def overall() -> int:
        resp = await node.health.Check(health_pb2.HealthCheckRequest(service=""), None)
        return int(resp.status)

    async def wait_for(status: int) -> None:
        deadline = time.monotonic() + 5
        while await overall() != status:
            assert time.monotonic() < deadline, f"health never became {status}"
            await asyncio.sleep(0.02)

    try:
        assert await overall() == SERVING
        now[0] = node.trust.current.not_after + timedelta(seconds=1)
        node.request_reload()
        await wait_for(NOT_SERVING)
        for service in OUR_SERVICES:
            resp = await node.health.Check(health_pb2.HealthCheckRequest(service=service), None)
            assert resp.status == NOT_SERVING, service
        now[0] = datetime.now(UTC)  # e.g. a renewed certificate, or the clock put right
        node.request_reload()
        await wait_for(SERVING)
    finally:
        await node.stop(grace=0.2)


# ----------------------------------------------------------------------------- trust health
# Per-component names beside the overall "" (issue 10): they never change "" by themselves.


async def health_of(node: Node, service: str) -> int:
    resp = await node.health.Check(health_pb2.HealthCheckRequest(service=service), None)
    return int(resp.status)


async def until_health(node: Node, service: str, want: int, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while await health_of(node, service) != want:
        assert time.monotonic() < deadline, f"{service} never became {want}"
        await asyncio.sleep(0.05)


async def test_a_peers_health_fails_after_three_failed_fetches_and_returns_with_one_success(
    districts: dict[str, DistrictSetup],
) -> None:
    """Only Dazu runs: its refresher (every second) cannot fetch its peers' bundles."""
    cfg = districts[DAZU].config
    dazu = await Node.start(replace(cfg, tls=replace(cfg.tls, reload_interval_ms=100)))
    anyue: Node | None = None
    try:
        refresher = dazu.refresher
        assert refresher is not None
        await until_health(dazu, peer_health_name(ANYUE), NOT_SERVING)
        assert refresher.failures[ANYUE] >= FAILURES_UNHEALTHY
        assert dazu.trust.health()[peer_health_name(ANYUE)] is True  # its trust itself is fine
        assert await health_of(dazu, "") == SERVING
        assert await health_of(dazu, CRL_HEALTH) == SERVING

        anyue = await Node.start(districts[ANYUE].config)  # the peer comes up
        await until_health(dazu, peer_health_name(ANYUE), SERVING)
        assert refresher.failures[ANYUE] == 0
        assert await health_of(dazu, peer_health_name(RONGCHANG)) == NOT_SERVING  # still down
    finally:
        if anyue is not None:
            await anyue.stop(grace=0.2)
        await dazu.stop(grace=0.2)


async def test_a_lapsed_revocation_list_turns_crl_health_not_serving_and_only_that(
    districts: dict[str, DistrictSetup],
) -> None:
    now = [datetime.now(UTC)]
    node = await Node.start(districts[DAZU].config, clock=lambda: now[0])
    try:
        assert await health_of(node, CRL_HEALTH) == SERVING
        (own,) = node.trust.current.districts[DAZU].crls.values()
        assert own.next_update is not None
        now[0] = own.next_update + timedelta(seconds=1)  # renew-due missed for a week
        await until_health(node, CRL_HEALTH, NOT_SERVING, within_s=5.0)
        assert await health_of(node, "") == SERVING  # the node's own certificate is valid
        for service in OUR_SERVICES:
            assert await health_of(node, service) == SERVING, service
    finally:
        await node.stop(grace=0.2)


async def test_a_node_records_how_long_its_answers_may_be_used_for_settlement(
    districts: dict[str, DistrictSetup],
) -> None:
    """TTL, then stale: a trip let through on a stale answer is judged by that answer."""
    cfg = districts[DAZU].config
    cfg = replace(
        cfg, recognition=replace(cfg.recognition, cache_ttl_seconds=90, max_stale_seconds=300)
    )
    node = await Node.start(cfg)
    try:
        assert node.registry.advertised_ttls()[-1][1] == 390
    finally:
        await node.stop(grace=0.1)


@pytest.fixture
def worker_cpu() -> Iterator[int]:
    """A CPU for the workers, leaving this process another; its affinity put back after."""
    before = os.sched_getaffinity(0)
    if len(before) < 2:
        unavailable("placement needs 2 CPUs this process may use")
    yield max(before)
    keep_to(before)  # a failed test must not leave the test runner on one CPU


async def test_with_worker_cpus_the_gates_keep_off_them_and_the_intake_worker_keeps_to_them(
    districts: dict[str, DistrictSetup], worker_cpu: int
) -> None:
    """Placement (broker.core.priority): the kernel's work for an upload stays off the gates."""
    cfg = districts[DAZU].config
    placed = replace(cfg, settlement=replace(cfg.settlement, worker_cpus=(worker_cpu,)))
    before = os.sched_getaffinity(0)
    node = await Node.start(placed, intake_listen="127.0.0.1:0")  # the worker starts now
    try:
        threads = [int(name) for name in os.listdir("/proc/self/task")]
        assert len(threads) > 3  # gRPC's, the cache's, the intake's pool's
        for tid in threads:  # every one, started before the placement or after
            assert os.sched_getaffinity(tid) == before - {worker_cpu}, tid
        pid = node.intake.worker_pid if node.intake is not None else None
        assert pid is not None
        assert os.sched_getaffinity(pid) == {worker_cpu}
        assert in_background(pid)
    finally:
        await node.stop(grace=0.2)
    assert os.sched_getaffinity(0) == before  # a stopped node puts its process back


@pytest.mark.parametrize("which", ["every", "absent"])
async def test_worker_cpus_that_leave_no_gate_cpu_or_are_not_usable_fail_the_start(
    districts: dict[str, DistrictSetup], which: str
) -> None:
    cfg = districts[DAZU].config
    before = os.sched_getaffinity(0)
    cpus = tuple(sorted(before)) if which == "every" else (4095,)
    message = "leave at least one to the gates" if which == "every" else "CPU 4095 is not one"
    placed = replace(cfg, settlement=replace(cfg.settlement, worker_cpus=cpus))
    with pytest.raises(ConfigError, match=rf"^settlement\.worker_cpus: .*{message}"):
        await Node.start(placed)
    assert os.sched_getaffinity(0) == before
    again = await Node.start(cfg)  # everything the failed start opened was closed
    await again.stop(grace=0.2)


async def test_a_placed_start_that_fails_later_gives_the_process_its_cpus_back(
    districts: dict[str, DistrictSetup], worker_cpu: int
) -> None:
    """Placement comes first; a start that fails after it (here: the port is taken) undoes it."""
    import socket

    cfg = districts[DAZU].config
    placed = replace(cfg, settlement=replace(cfg.settlement, worker_cpus=(worker_cpu,)))
    host, port = cfg.listen.rsplit(":", 1)
    squatter = socket.socket()
    squatter.bind((host, int(port)))
    squatter.listen()
    before = os.sched_getaffinity(0)
    try:
        with pytest.raises(ConfigError, match="cannot listen on"):
            await Node.start(placed)
    finally:
        squatter.close()
    assert os.sched_getaffinity(0) == before
    for name in os.listdir("/proc/self/task"):
        assert os.sched_getaffinity(int(name)) == before, name
