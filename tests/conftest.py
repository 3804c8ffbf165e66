"""Shared fixtures: real Redis, real certificates, real nodes on loopback.

Redis: ``YIKATONG_TEST_REDIS_URL`` if set; else database 15 of a server
answering on 127.0.0.1:6379; else a private ``redis-server`` started on a free port for
the session. When none can be had, Redis tests skip — except under ``CI``,
where they fail.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from broker.node.server import Node
from broker.testbed import build as testbed
from broker.testbed.clock import DayClock
from broker.testbed.operator_client import GateClient, open_channel
from broker.trust.config import node_server_name

DAZU, ANYUE, RONGCHANG = "500111", "512021", "500153"
THREE = (DAZU, ANYUE, RONGCHANG)
IN_CI = bool(os.environ.get("CI"))


def unavailable(reason: str) -> None:
    """Skip locally; fail in CI, where every real-service test must run."""
    if IN_CI:
        pytest.fail(f"{reason} (CI is set: tests of real services must not skip)")
    pytest.skip(reason)


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=0.5).ping())
    except (redis.RedisError, OSError):
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("YIKATONG_TEST_REDIS_URL")
    if url:
        if not _pings(url):
            unavailable(f"YIKATONG_TEST_REDIS_URL={url} does not answer")
        yield url
        return
    if _pings("redis://127.0.0.1:6379/15"):
        yield "redis://127.0.0.1:6379/15"  # a database of its own on a shared server
        return
    started = _start_redis(tmp_path_factory.mktemp("redis"))
    if started is None:
        unavailable("no Redis reachable, and no redis-server binary that starts")
        return
    url, proc = started
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _start_redis(workdir: Path) -> tuple[str, subprocess.Popen[bytes]] | None:
    """A redis-server of our own on a free port (``None``: no binary, or it did not start)."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    workdir.mkdir(parents=True, exist_ok=True)
    port = testbed.free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while not _pings(url):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            proc.wait()
            return None
        time.sleep(0.05)
    return url, proc


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A Redis server of this test's own, (url, pid): one a test may freeze (SIGSTOP) or kill."""
    started = _start_redis(tmp_path / "redis")
    if started is None:
        unavailable("no redis-server binary to start a private Redis")
        return
    url, proc = started
    try:
        yield url, proc.pid
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
            proc.wait(timeout=10)


@pytest.fixture
def redis_db(redis_url: str) -> Iterator[str]:
    """A Redis URL with no broker keys in it, cleaned again afterwards."""

    def clean() -> None:
        with redis.Redis.from_url(redis_url) as client:
            for key in client.scan_iter("yk:*"):
                client.delete(key)

    clean()
    yield redis_url
    clean()


@pytest.fixture
def now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture
def districts(tmp_path: Path, now: datetime) -> dict[str, testbed.DistrictSetup]:
    """Three districts' certificates, configs and registries (not started)."""
    return testbed.build(tmp_path, THREE, now, cards_per_district=60, bundle_refresh_s=1)


class Cluster:
    """Started nodes plus an operator client per district."""

    def __init__(
        self,
        setups: dict[str, testbed.DistrictSetup],
        nodes: dict[str, Node],
        clock: DayClock | None = None,
    ):
        self.setups = setups
        self.nodes = nodes
        self.clock = clock or DayClock()  # the nodes' time, moved on by tests of a settlement day
        self._channels: list[object] = []

    def gate(self, district: str, operator_id: str | None = None) -> GateClient:
        s = self.setups[district]
        ch = open_channel(
            self.nodes[district].address,
            node_server_name(s.code),
            s.paths.ca_cert,
            s.operator_cert,
            s.operator_key,
        )
        self._channels.append(ch)
        return GateClient(ch, operator_id or s.operator_id)

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close()  # type: ignore[attr-defined]
        for node in self.nodes.values():
            await node.stop(grace=0.2)


@pytest.fixture
async def cluster(districts: dict[str, testbed.DistrictSetup]) -> AsyncIterator[Cluster]:
    clock = DayClock()
    nodes = {code: await Node.start(s.config, clock) for code, s in districts.items()}
    c = Cluster(districts, nodes, clock)
    try:
        yield c
    finally:
        await c.close()


def _pg_answers(url: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def _pg_binaries() -> Path | None:
    """The directory of ``initdb``/``pg_ctl`` (Debian keeps them out of PATH)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent  # the real bin directory, with createdb and pg_ctl
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
    return candidates[0].parent if candidates else None


def _start_private_postgres(workdir: Path) -> tuple[str, Callable[[], None]] | None:
    """A throwaway PostgreSQL cluster on a free port (as user postgres when we are root)."""
    bindir = _pg_binaries()
    if bindir is None:
        return None
    port = testbed.free_port()
    data = workdir / "pgdata"
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        run_as = ["runuser", "-u", "postgres", "--"]
        workdir.chmod(0o777)  # a directory of its own under /tmp, reachable by postgres
    subprocess.run(
        [*run_as, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    opts = f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=on"
    subprocess.run(
        [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-w", "start"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    subprocess.run(
        [
            *run_as,
            str(bindir / "createdb"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-U",
            "postgres",
            "test",
        ],
        check=True,
    )

    def stop() -> None:
        subprocess.run(
            [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
            check=False,
            stdout=subprocess.DEVNULL,
        )

    return f"postgresql://postgres@127.0.0.1:{port}/test", stop


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``YIKATONG_TEST_POSTGRES_URL``, else database ``test`` on 127.0.0.1:5432 (trust auth),
    else a private cluster started for the session (``initdb`` from the postgresql package).

    Without any: skip locally, fail under CI.
    """
    url = os.environ.get("YIKATONG_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
    if _pg_answers(url):
        yield url
        return
    started = None
    try:
        workdir = Path(tempfile.mkdtemp(prefix="yikatong-pg-"))
        started = _start_private_postgres(workdir)
    except (subprocess.CalledProcessError, OSError) as exc:
        unavailable(f"a private PostgreSQL did not start: {exc}")
    if started is None:
        unavailable(
            f"no PostgreSQL at {url} and no initdb to start one: apt-get install postgresql "
            "or set YIKATONG_TEST_POSTGRES_URL"
        )
        return
    private, stop = started
    try:
        yield private
    finally:
        stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[object]:
    """Opens the ledger under test: the same suite runs on SQLite and on PostgreSQL."""
    from broker.settlement.ledger import open_ledger

    if request.param == "sqlite":
        yield lambda: open_ledger(tmp_path / "ledger.sqlite3", None)
        return
    import secrets

    import psycopg

    url = request.getfixturevalue("postgres_url")
    schema = f"yk_test_{secrets.token_hex(4)}"
    yield lambda: open_ledger(None, url, schema)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgres"])
def registry_at(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Where a registry under test lives: ``registry_at(name)`` is a ``[registry]`` section
    for a SQLite file, or for a PostgreSQL schema of its own (dropped afterwards); the same
    suite runs on both."""
    from broker.cards.config import RegistryConfig

    if request.param == "sqlite":
        yield lambda name="r": RegistryConfig(tmp_path / f"{name}.sqlite3")
        return
    import secrets

    import psycopg

    url = request.getfixturevalue("postgres_url")
    prefix = f"yk_reg_{secrets.token_hex(4)}"
    yield lambda name="r": RegistryConfig(None, url=url, schema=f"{prefix}_{name}")
    with psycopg.connect(url, autocommit=True) as conn:
        for (schema,) in conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", (f"{prefix}%",)
        ).fetchall():
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgres"])
async def day_cluster(
    request: pytest.FixtureRequest, tmp_path: Path, now: datetime
) -> AsyncIterator[Cluster]:
    """Three running districts whose ledgers (and clearing tables) are SQLite or PostgreSQL."""
    import secrets

    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    prefix = f"ykt{secrets.token_hex(3)}"
    setups = testbed.build(
        tmp_path,
        THREE,
        now,
        cards_per_district=60,
        bundle_refresh_s=1,
        ledger_url=url,
        ledger_schema_prefix=prefix,
    )
    clock = DayClock()
    nodes = {code: await Node.start(s.config, clock) for code, s in setups.items()}
    c = Cluster(setups, nodes, clock)
    try:
        yield c
    finally:
        await c.close()
        if url:
            import psycopg

            with psycopg.connect(url, autocommit=True) as conn:
                for code in THREE:
                    conn.execute(f"DROP SCHEMA IF EXISTS {prefix}_{code} CASCADE")
