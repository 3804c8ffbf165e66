"""broker/core/watch.py: a file changed is a file whose inode, mtime (ns) or size changed."""

from __future__ import annotations

import os
from pathlib import Path

from broker.core.watch import MISSING, FileWatch, file_stamp

BROKER = Path(__file__).resolve().parents[2] / "broker"


def replace_keeping_size_and_mtime(path: Path, content: bytes) -> None:
    """What ``rsync -t`` or a renewal of equal length does: a new inode, nothing else to see."""
    assert len(content) == path.stat().st_size
    before = path.stat()
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(content)
    os.utime(tmp, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(tmp, path)
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_a_file_replaced_by_rename_with_the_same_size_and_mtime_is_a_change(tmp_path: Path):
    f = tmp_path / "node.pem"
    f.write_bytes(b"certificate A")
    watch = FileWatch([f])
    replace_keeping_size_and_mtime(f, b"certificate B")
    assert watch.changed()


def test_untouched_files_are_no_change_and_a_marked_change_is_seen_once(tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"1")
    b.write_bytes(b"2")
    watch = FileWatch([a, b])
    assert not watch.changed()
    b.write_bytes(b"22")  # in place, another size
    assert watch.changed()
    assert watch.changed()  # looking does not mark
    watch.mark_seen()
    assert not watch.changed()


def test_a_deleted_file_and_a_file_that_appears_are_changes(tmp_path: Path):
    present, absent = tmp_path / "crl.pem", tmp_path / "later.pem"
    present.write_bytes(b"crl")
    watch = FileWatch([present, absent])
    assert watch.stamps()[1] == MISSING
    present.unlink()
    assert watch.changed()
    watch.mark_seen()
    absent.write_bytes(b"now here")
    assert watch.changed()


def test_stamps_taken_before_a_read_keep_a_change_made_during_it_visible(tmp_path: Path):
    f = tmp_path / "bundle.json"
    f.write_bytes(b"{}")
    watch = FileWatch([f])
    f.write_bytes(b'{"sequence": 2}')
    taken = watch.stamps()  # the reader stamps, then reads ...
    f.write_bytes(b'{"sequence": 333}')  # ... while the file changes again
    assert watch.changed(taken)
    watch.mark_seen(taken)
    assert watch.changed()  # the later change is still seen at the next look


def test_file_stamp_is_inode_mtime_ns_and_size(tmp_path: Path):
    f = tmp_path / "k"
    f.write_bytes(b"12345")
    st = f.stat()
    assert file_stamp(f) == (st.st_ino, st.st_mtime_ns, 5)
    assert file_stamp(tmp_path / "nope") == MISSING


def test_only_the_watch_helper_reads_modification_times():
    """One mechanism: no other module in broker/ stats files for changes by itself."""
    readers = sorted(
        str(p.relative_to(BROKER))
        for p in BROKER.rglob("*.py")
        if "_proto" not in p.parts and "st_mtime" in p.read_text()
    )
    assert readers == ["core/watch.py"]
