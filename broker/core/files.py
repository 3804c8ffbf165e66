"""Files only their owner may read: the databases, their directories, the keys beside them.

Whatever the umask, a directory this creates is 0700 and a database file 0600; an existing
file (and SQLite's ``-wal``, ``-shm`` and ``-journal`` beside it) loses any group and other
bits before it is opened.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
_SIDECARS = ("-wal", "-shm", "-journal")


def make_private_dirs(directory: Path) -> None:
    """Create ``directory`` and its missing parents, each 0700 whatever the umask.

    Only the directories created here are chmod'ed; existing ones are left as they are.
    """
    missing: list[Path] = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:
            continue  # made meanwhile by another process: not ours
        d.chmod(PRIVATE_DIR)  # mkdir's mode went through the umask


def private_file(path: Path) -> None:
    """Make ``path`` a file only its owner may read or write, before SQLite opens it.

    A missing file is created empty (which SQLite takes for an empty
    database) with mode 0600. An existing one, and its ``-wal``, ``-shm`` and
    ``-journal``, lose any group and other permission bits.
    """
    make_private_dirs(path.parent)
    dir_mode = stat.S_IMODE(path.parent.stat().st_mode)
    if dir_mode & (stat.S_IROTH | stat.S_IWOTH):
        log.warning(
            "database directory is open to other users",
            directory=str(path.parent),
            mode=oct(dir_mode),
        )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE)
    except FileExistsError:
        pass
    else:
        try:
            os.fchmod(fd, PRIVATE_FILE)  # the umask may have taken the owner's bits too
        finally:
            os.close(fd)
    for p in (path, *(path.with_name(path.name + suffix) for suffix in _SIDECARS)):
        try:
            mode = stat.S_IMODE(p.stat().st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            try:
                p.chmod(mode & ~0o077)
            except PermissionError:
                log.warning("database file is open to other users", path=str(p), mode=oct(mode))
            else:
                log.info("database file made private", path=str(p), mode=oct(mode & ~0o077))
