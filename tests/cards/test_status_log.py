"""The home's status log: gapless numbers in commit order, epochs, restored copies, retention."""

from __future__ import annotations

import multiprocessing as mp
import shutil
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from broker.cards import status_log
from broker.cards.config import RegistryConfig
from broker.cards.csv_import import CardRow
from broker.cards.model import CardStatus, LogPosition
from broker.cards.registry import Registry
from broker.cards.status_log import Restart, StatusEvent

RegistryAt = Callable[..., RegistryConfig]
T0 = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)
START = LogPosition("", 0, "")


def row(number: str, status: str = "active") -> CardRow:
    return CardRow(number, "h" * 32, date(1950, 1, 1), status, False, False, date(2030, 1, 1))


def log_one(reg: Registry, number: str, status: CardStatus, at: datetime = T0) -> int:
    with reg.db.write():
        return status_log.append(reg.db, number, status, at, at, at)


def events(reg: Registry, after: LogPosition) -> list[StatusEvent]:
    got = status_log.read(reg.db, after)
    assert isinstance(got, list), got
    return got


def from_start(reg: Registry) -> LogPosition:
    return LogPosition(status_log.head(reg.db).epoch, 0, "")


def test_numbers_follow_each_other_and_a_cursor_reads_on_from_where_it_is(registry_at: RegistryAt):
    reg = Registry(registry_at())
    assert status_log.head(reg.db).seq == 0
    seqs = [log_one(reg, f"C{i}", CardStatus.LOST) for i in range(1, 4)]
    assert seqs == [1, 2, 3]
    every = events(reg, from_start(reg))
    assert [(e.seq, e.card_number, e.refuses) for e in every] == [
        (1, "C1", True),
        (2, "C2", True),
        (3, "C3", True),
    ]
    assert [e.seq for e in events(reg, every[1].cursor)] == [3]
    assert events(reg, every[2].cursor) == []
    assert status_log.head(reg.db) == every[2].cursor
    reg.close()


def test_an_active_card_is_only_an_invalidation(registry_at: RegistryAt):
    reg = Registry(registry_at())
    log_one(reg, "C1", CardStatus.ACTIVE)
    log_one(reg, "C2", CardStatus.EXPIRED)
    active, expired = events(reg, from_start(reg))
    assert not active.refuses and expired.refuses
    reg.close()


def test_a_transaction_that_fails_after_its_event_leaves_no_event_and_no_gap(
    registry_at: RegistryAt,
):
    reg = Registry(registry_at())
    log_one(reg, "C1", CardStatus.LOST)
    with pytest.raises(RuntimeError), reg.db.write():
        status_log.append(reg.db, "C2", CardStatus.LOST, T0, T0, T0)
        raise RuntimeError("the change beside it failed")
    assert status_log.head(reg.db).seq == 1
    assert log_one(reg, "C3", CardStatus.LOST) == 2
    assert [e.card_number for e in events(reg, from_start(reg))] == ["C1", "C3"]
    reg.close()


def test_no_cursor_or_another_epoch_restarts_at_the_head(registry_at: RegistryAt):
    reg = Registry(registry_at())
    log_one(reg, "C1", CardStatus.LOST)
    head = status_log.head(reg.db)
    assert isinstance(none := status_log.read(reg.db, None), Restart) and none.head == head
    other = status_log.read(reg.db, LogPosition("f" * 32, 1, head.mark))
    assert isinstance(other, Restart) and "epoch" in other.reason
    reg.close()


def test_a_reset_starts_a_new_history_and_every_old_cursor_restarts(registry_at: RegistryAt):
    reg = Registry(registry_at())
    log_one(reg, "C1", CardStatus.LOST)
    old = status_log.head(reg.db)
    new = status_log.reset(reg.db, "a" * 32, T0)
    assert (new.epoch, new.seq) == ("a" * 32, 0) and new.epoch != old.epoch
    assert isinstance(status_log.read(reg.db, old), Restart)
    assert log_one(reg, "C2", CardStatus.LOST) == 1
    assert [e.card_number for e in events(reg, new)] == ["C2"]
    reg.close()


def test_two_registries_start_in_different_epochs(tmp_path: Path):
    a, b = Registry(tmp_path / "a.sqlite3"), Registry(tmp_path / "b.sqlite3")
    assert status_log.head(a.db).epoch != status_log.head(b.db).epoch
    assert len(status_log.head(a.db).epoch) == 32
    a.close()
    b.close()


def test_a_registry_restored_from_an_older_copy_is_another_history(tmp_path: Path):
    """The copy keeps the epoch; the mark tells the difference, whether the cursor is past the
    copy's end or the copy has since written other events under the same numbers."""
    path = tmp_path / "r.sqlite3"
    reg = Registry(path)
    log_one(reg, "C1", CardStatus.LOST)
    reg.close()
    shutil.copy(path, tmp_path / "backup.sqlite3")
    reg = Registry(path)
    log_one(reg, "C2", CardStatus.LOST)
    log_one(reg, "C3", CardStatus.LOST)
    at_three = status_log.head(reg.db)
    at_two = events(reg, from_start(reg))[1].cursor
    reg.close()

    shutil.copy(tmp_path / "backup.sqlite3", path)  # restored: events 2 and 3 are gone
    reg = Registry(path)
    past = status_log.read(reg.db, at_three)
    assert isinstance(past, Restart) and "restored" in past.reason
    log_one(reg, "X2", CardStatus.SUSPENDED)  # numbered 2 again, but another event
    log_one(reg, "X3", CardStatus.SUSPENDED)
    differs = status_log.read(reg.db, at_two)
    assert isinstance(differs, Restart) and "history" in differs.reason
    assert status_log.head(reg.db).epoch == at_three.epoch  # the epoch alone would not tell
    reg.close()


def test_retention_keeps_the_last_event_so_a_peer_that_saw_everything_goes_on(
    registry_at: RegistryAt,
):
    reg = Registry(registry_at())
    log_one(reg, "C1", CardStatus.LOST, T0)
    log_one(reg, "C2", CardStatus.LOST, T0)
    at_head = status_log.head(reg.db)
    assert status_log.purge(reg.db, T0 + timedelta(days=30)) == 1  # C1 only
    assert events(reg, at_head) == []
    log_one(reg, "C3", CardStatus.LOST, T0 + timedelta(days=30))
    assert [e.card_number for e in events(reg, at_head)] == ["C3"]
    reg.close()


def test_retention_drops_old_events_and_a_cursor_before_them_restarts(registry_at: RegistryAt):
    reg = Registry(registry_at())
    log_one(reg, "C1", CardStatus.LOST, T0)
    log_one(reg, "C2", CardStatus.LOST, T0 + timedelta(hours=1))
    first = events(reg, from_start(reg))[0].cursor
    log_one(reg, "C3", CardStatus.LOST, T0 + timedelta(hours=5))
    assert status_log.purge(reg.db, T0 + timedelta(hours=2)) == 2
    for behind in (from_start(reg), first):
        got = status_log.read(reg.db, behind)
        assert isinstance(got, Restart) and "kept" in got.reason
    assert log_one(reg, "C4", CardStatus.LOST) == 4  # numbering goes on
    assert [e.seq for e in events(reg, status_log.head(reg.db))] == []
    reg.close()


def test_the_import_logs_every_change_it_records_and_nothing_else(registry_at: RegistryAt):
    reg = Registry(registry_at())
    reg.upsert([row("A1"), row("A2")], T0)
    reg.upsert([row("A1", "lost"), row("A2")], T0 + timedelta(hours=1))  # A2 unchanged
    flagged = CardRow("A2", "h" * 32, date(1950, 1, 1), "active", True, False, date(2030, 1, 1))
    reg.upsert([flagged], T0 + timedelta(hours=2))
    corrected = CardRow("A1", "h" * 32, date(1960, 1, 1), "lost", False, False, date(2030, 1, 1))
    reg.upsert([corrected], T0 + timedelta(hours=3))  # a birth date corrected
    got = [(e.seq, e.card_number, e.status) for e in events(reg, from_start(reg))]
    assert got == [
        (1, "A1", CardStatus.ACTIVE),  # new cards: a cached UNKNOWN must go
        (2, "A2", CardStatus.ACTIVE),
        (3, "A1", CardStatus.LOST),
        (4, "A2", CardStatus.ACTIVE),  # a flag changed: invalidate, no entitlements in it
        (5, "A1", CardStatus.LOST),  # entitlements follow the birth date: told as well
    ]
    reg.close()


def _writer(where: RegistryConfig, name: str, n: int) -> None:
    reg = Registry(where)
    try:
        for i in range(n):
            log_one(reg, f"{name}{i}", CardStatus.LOST)
    finally:
        reg.close()


def _reader(where: RegistryConfig, stop_at: int, out: mp.Queue) -> None:  # type: ignore[type-arg]
    """Follows the log as it grows: every read must go on exactly from its cursor."""
    reg = Registry(where)
    try:
        cursor = from_start(reg)
        seen: list[int] = []
        while cursor.seq < stop_at:
            for event in events(reg, cursor):
                seen.append(event.seq)
                cursor = event.cursor
        out.put(seen)
    finally:
        reg.close()


def test_two_processes_writing_at_once_leave_no_gap_a_follower_could_fall_into(
    registry_at: RegistryAt,
):
    """Numbers are taken in the writing transaction, so no later number commits before an
    earlier one: a follower reading as they write sees 1, 2, 3, … and nothing skipped (on
    PostgreSQL too, where the counter row's lock orders the writers)."""
    path = registry_at()
    Registry(path).close()
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    procs = [ctx.Process(target=_writer, args=(path, name, 60)) for name in ("A", "B")]
    follower = ctx.Process(target=_reader, args=(path, 120, out))
    follower.start()
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    seen = out.get(timeout=60)
    follower.join(10)
    assert seen == list(range(1, 121))
    reg = Registry(path)
    cards = [e.card_number for e in events(reg, from_start(reg))]
    assert sorted(cards) == sorted([f"A{i}" for i in range(60)] + [f"B{i}" for i in range(60)])
    reg.close()
    out.close()
    out.join_thread()
