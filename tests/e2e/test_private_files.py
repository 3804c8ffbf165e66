"""Personal data at rest is private whatever the umask (issue 11, item 3).

The demo's settlement day (broker/testbed/demo_day.py) runs over three real nodes
built and started under a permissive umask (0022, the usual default, and 0000).
Every SQLite file it leaves under var/ (registries, ledgers, clearing stores), with
the -wal and -shm seen while the nodes run, must be 0600 in directories others may not
read, and each district's hash key 0600.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from broker.node.server import Node
from broker.testbed.build import build
from broker.testbed.clock import DayClock
from broker.testbed.demo_day import run_day
from broker.testbed.operator_client import GateClient
from tests.conftest import THREE

OPEN_TO_OTHERS = stat.S_IROTH | stat.S_IWOTH


@pytest.fixture
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """The process umask set to the test's parameter for the test (restored after)."""
    saved = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(saved)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def database_files(var: Path) -> dict[Path, int]:
    """Every SQLite file under ``var`` with its -wal, -shm (and any -journal), and its mode."""
    found = {}
    for pattern in ("*.sqlite3", "*.sqlite3-wal", "*.sqlite3-shm", "*.sqlite3-journal"):
        found.update({p: mode(p) for p in var.rglob(pattern)})
    return found


def open_directories(var: Path, files: dict[Path, int]) -> dict[Path, int]:
    """The directories from ``var`` down to each file that others may read or write."""
    dirs = {var} | {d for f in files for d in f.parents if d.is_relative_to(var)}
    return {d: mode(d) for d in dirs if mode(d) & OPEN_TO_OTHERS}


async def run_demo_day(root: Path) -> tuple[dict[Path, int], dict[Path, int]]:
    """Build and start three districts, run a small demo day; the files seen while the
    nodes ran (after the day) and after they stopped."""
    clock = DayClock()
    setups = build(root, THREE, clock(), cards_per_district=40)
    nodes = {code: await Node.start(s.config, clock) for code, s in setups.items()}
    channels: dict[str, grpc.aio.Channel] = {}
    try:
        gates = {}
        for code, s in setups.items():
            channels[code] = s.operator_channel(nodes[code].address)
            gates[code] = GateClient(channels[code], s.operator_id)
        report = await run_day(setups, channels, gates, clock, seed=5, per_home=4)
        assert report["trips"] > 0 and report["nets_sum_fen"] == 0
        running = database_files(root / "var")
    finally:
        for ch in channels.values():
            await ch.close()
        for node in nodes.values():
            await node.stop(grace=0.2)
    return running, database_files(root / "var")


@pytest.mark.parametrize("umask", [0o022, 0o000], indirect=True, ids=["umask-022", "umask-000"])
async def test_every_database_file_of_a_demo_day_is_0600_in_a_private_directory(
    tmp_path: Path, umask: int
):
    root = tmp_path / "bed"
    running, stopped = await run_demo_day(root)
    var = root / "var"
    for code in THREE:  # the premise: the day made every kind of file, and SQLite its sidecars
        for name in ("registry.sqlite3", "ledger.sqlite3", "ledger-clearing.sqlite3"):
            assert var / code / name in stopped, name
        for name in ("registry.sqlite3-wal", "registry.sqlite3-shm", "ledger.sqlite3-wal"):
            assert var / code / name in running, name
    for seen in (running, stopped):
        assert {p: oct(m) for p, m in seen.items() if m != 0o600} == {}
        assert open_directories(var, seen) == {}
    for code in THREE:
        key = root / "certs" / code / "hash.key"
        assert key.is_file() and mode(key) == 0o600, key
        assert mode(var / code / "cards.csv") == 0o600  # the import file holds ID numbers


@pytest.mark.parametrize("umask", [0o022, 0o000], indirect=True, ids=["umask-022", "umask-000"])
def test_the_hash_keys_directory_is_not_open_to_others(tmp_path: Path, umask: int):
    setups = build(tmp_path / "bed", THREE[:1], datetime.now(UTC), cards_per_district=1)
    key = setups[THREE[0]].paths.hash_key
    assert mode(key) == 0o600
    assert mode(key.parent) & OPEN_TO_OTHERS == 0
