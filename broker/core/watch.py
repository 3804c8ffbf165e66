"""Noticing that files changed, in one place: a stamp of each file, compared as a whole.

A file's stamp is its inode, modification time (ns) and size. Certificates,
keys, revocation lists and bundles are replaced by rename (``broker certs``,
the bundle refresher, ``rsync``), so a new file shows in the inode even when
it has the same size and modification time as the old one (``rsync -t``, a
renewed certificate of the same length). A file that cannot be stat'ed has a
stamp of its own, so a deletion or a file in the middle of being replaced is a
change too; whoever reads the files decides what a missing one means.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

FileStamp = tuple[int, int, int]
MISSING: FileStamp = (0, 0, 0)


def file_stamp(path: Path) -> FileStamp:
    """``(inode, mtime in ns, size)`` of ``path``, or :data:`MISSING`."""
    try:
        st = path.stat()
    except OSError:
        return MISSING
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class FileWatch:
    """Whether any of a fixed list of files changed since it was last marked as seen.

    A stat per file per look: cheap enough to call on every reload tick.
    """

    def __init__(self, files: Iterable[Path]) -> None:
        self.files = tuple(files)
        self._seen = self.stamps()

    def stamps(self) -> tuple[FileStamp, ...]:
        """The current stamp of every file, in order."""
        return tuple(file_stamp(f) for f in self.files)

    def changed(self, stamps: tuple[FileStamp, ...] | None = None) -> bool:
        """Whether any file (or ``stamps``, taken earlier) differs from what was last seen."""
        return (self.stamps() if stamps is None else stamps) != self._seen

    def mark_seen(self, stamps: tuple[FileStamp, ...] | None = None) -> None:
        """Take ``stamps`` (default: the files as they are now) as seen.

        Mark before reading the files: a change made while they are read is
        then still seen at the next look.
        """
        self._seen = self.stamps() if stamps is None else stamps
