"""Private files and directories (broker/core/files.py), whatever the umask.

Opening a database through them is tested in tests/core/test_db.py.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from broker.core.files import make_private_dirs, private_file


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_make_private_dirs_chmods_only_what_it_creates(tmp_path: Path):
    top = tmp_path / "top"
    top.mkdir()
    top.chmod(0o755)
    saved = os.umask(0)
    try:
        make_private_dirs(top / "a" / "b")
        make_private_dirs(top / "a" / "b")  # already there: nothing to do
    finally:
        os.umask(saved)
    assert (mode(top), mode(top / "a"), mode(top / "a" / "b")) == (0o755, 0o700, 0o700)


def test_private_file_creates_an_empty_0600_file_and_closes_an_existing_ones_sidecars(
    tmp_path: Path,
):
    fresh = tmp_path / "new" / "x.sqlite3"
    private_file(fresh)
    assert fresh.read_bytes() == b"" and mode(fresh) == 0o600
    old = tmp_path / "old.sqlite3"
    old.write_bytes(b"data")
    wal = tmp_path / "old.sqlite3-wal"
    wal.write_bytes(b"w")
    for p in (old, wal):
        p.chmod(0o664)
    private_file(old)
    assert (mode(old), mode(wal), old.read_bytes()) == (0o600, 0o600, b"data")
