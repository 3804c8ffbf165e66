"""Privacy by construction: card and ID numbers never reach logs or the registry file,
and the hash key file is private and durable whatever the umask.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import grpc
import pytest
import structlog
from structlog.testing import capture_logs

from broker.cards.model import CardRef, Scene
from broker.cards.privacy import KEY_BYTES, create_key_file, load_key_file
from tests.conftest import ANYUE, DAZU, Cluster
from tests.helpers import import_lines, registry_file, ssn_for


@pytest.fixture
def all_levels() -> Iterator[None]:
    structlog.reset_defaults()  # every level, whatever an earlier test configured
    yield
    structlog.reset_defaults()


async def test_no_card_or_id_number_in_any_log_event_or_the_registry_file(
    cluster: Cluster, now: datetime, all_levels: None
):
    secret_ssn = ssn_for(ANYUE, "19500101")
    import_lines(
        cluster.setups[ANYUE], [f"PRIVATE00001,{secret_ssn},active,false,false,2035-01-01"], now
    )
    numbers = ["PRIVATE00001", "NOSUCH000009", "C500118000001", "BADOP0000001"]
    with capture_logs() as events:
        gate = cluster.gate(DAZU)
        for ref in (
            CardRef(ANYUE, numbers[0]),
            CardRef(ANYUE, numbers[1]),
            CardRef("500118", numbers[2]),
            CardRef(DAZU, numbers[1]),
        ):
            await gate.check(ref, Scene.BUS)
        refused = cluster.gate(DAZU, operator_id="not-me")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await refused.check(CardRef(ANYUE, numbers[3]), Scene.BUS)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert {e["event"] for e in events} >= {"recognized", "peer_answer", "call_refused"}
    text = repr(events)
    for secret in [*numbers, secret_ssn, "19500101"]:
        assert secret not in text
    for code in (DAZU, ANYUE):
        raw = registry_file(cluster.setups[code].config).read_bytes()
        assert secret_ssn.encode() not in raw
        wal = registry_file(cluster.setups[code].config).with_name("registry.sqlite3-wal")
        if wal.exists():
            assert secret_ssn.encode() not in wal.read_bytes()


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o277])
def test_a_new_hash_key_file_is_0600_in_new_0700_directories_whatever_the_umask(
    tmp_path: Path, mask: int
):
    path = tmp_path / "certs" / "500111" / "hash.key"
    saved = os.umask(mask)
    try:
        create_key_file(path)
    finally:
        os.umask(saved)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for d in (path.parent, path.parent.parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert len(bytes.fromhex(path.read_text().strip())) == KEY_BYTES
    load_key_file(path)


def test_the_hash_key_and_its_directory_entry_are_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    path = tmp_path / "hash.key"
    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        synced.append((f"{info.st_dev}:{info.st_ino}", stat.S_ISDIR(info.st_mode)))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    create_key_file(path)
    ident = {p: (f"{p.stat().st_dev}:{p.stat().st_ino}", p.is_dir()) for p in (path, path.parent)}
    assert ident[path] in synced
    assert ident[path.parent] in synced
    assert synced.index(ident[path]) < synced.index(ident[path.parent])  # the key, then its name


def test_an_existing_hash_key_is_never_overwritten(tmp_path: Path):
    path = tmp_path / "hash.key"
    create_key_file(path)
    key = path.read_bytes()
    with pytest.raises(FileExistsError):
        create_key_file(path)
    assert path.read_bytes() == key
