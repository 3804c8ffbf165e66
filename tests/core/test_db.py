"""Database access: SQLite files (WAL, synchronous FULL, private), UTC text, the Db wrapper.

SQLite files, with their -wal and -shm, are 0600 in 0700 directories whatever the umask;
the tests set a permissive umask themselves and restore it.

The wrapper is exercised on SQLite and, through the ``postgres_url`` fixture, on PostgreSQL
in a schema of its own that is dropped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import structlog.testing

from broker.core.db import Db, Migration, migrate, schema_version, utc_text
from broker.core.errors import ConfigError

SCHEMA = "CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v BIGINT NOT NULL)"


# --- Db.sqlite: how a file is opened ----------------------------------------------------


def test_a_sqlite_file_uses_wal_full_sync_and_a_busy_timeout(tmp_path: Path):
    db = Db.sqlite(tmp_path / "a.sqlite3")
    try:
        assert db.one("PRAGMA journal_mode") == ("wal",)
        assert db.one("PRAGMA synchronous") == (2,)  # FULL
        assert db.one("PRAGMA busy_timeout") == (5000,)
    finally:
        db.close()
    slow = Db.sqlite(tmp_path / "b.sqlite3", busy_timeout_ms=120_000)
    try:
        assert slow.one("PRAGMA busy_timeout") == (120_000,)
    finally:
        slow.close()


def test_opening_a_file_creates_missing_directories(tmp_path: Path):
    path = tmp_path / "deep" / "er" / "ledger.sqlite3"
    db = Db.sqlite(path)
    try:
        db.script(SCHEMA + "; CREATE TABLE IF NOT EXISTS u (x TEXT)")
        assert path.is_file()
        names = {r[0] for r in db.all("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"t", "u"} <= names
    finally:
        db.close()


def test_a_statement_outside_a_write_is_committed_at_once(tmp_path: Path):
    """Autocommit mode: without :meth:`Db.write` another reader sees the row at once."""
    path = tmp_path / "a.sqlite3"
    db = Db.sqlite(path)
    db.script(SCHEMA)
    other = sqlite3.connect(path)
    try:
        db.execute("INSERT INTO t VALUES ('a', 1)")
        assert other.execute("SELECT v FROM t WHERE k = 'a'").fetchone() == (1,)
    finally:
        other.close()
        db.close()


def test_reopening_an_existing_file_keeps_its_rows(tmp_path: Path):
    path = tmp_path / "a.sqlite3"
    db = Db.sqlite(path)
    db.script(SCHEMA)
    db.execute("INSERT INTO t VALUES ('a', 1)")
    db.close()
    again = Db.sqlite(path)
    try:
        assert again.all("SELECT k, v FROM t") == [("a", 1)]
    finally:
        again.close()


@contextmanager
def umask(mask: int) -> Iterator[None]:
    """The process umask set to ``mask`` for the block (it is process-wide: restore it)."""
    saved = os.umask(mask)
    try:
        yield
    finally:
        os.umask(saved)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o277])
def test_a_new_file_and_its_wal_and_shm_are_0600_in_new_0700_directories(tmp_path: Path, mask: int):
    """Whatever the umask: a permissive one (0000, 0022) or one that takes the owner's bits."""
    path = tmp_path / "deep" / "er" / "ledger.sqlite3"
    with umask(mask):
        db = Db.sqlite(path)
        try:
            db.script(SCHEMA)
            db.execute("INSERT INTO t VALUES ('a', 1)")
            wal, shm = path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")
            assert wal.exists() and shm.exists()  # while open: the last close removes them
            assert {p.name: mode(p) for p in (path, wal, shm)} == {
                p.name: 0o600 for p in (path, wal, shm)
            }
        finally:
            db.close()
    assert (mode(tmp_path / "deep"), mode(tmp_path / "deep" / "er")) == (0o700, 0o700)
    assert mode(tmp_path) == stat.S_IMODE(tmp_path.stat().st_mode)  # not created: not changed


def test_an_existing_file_and_its_leftover_wal_and_shm_lose_group_and_other_access(
    tmp_path: Path,
):
    """A file left readable by an older release (or a copy) is made private when opened."""
    path = tmp_path / "registry.sqlite3"
    db = Db.sqlite(path)
    db.script(SCHEMA)
    db.close()
    wal, shm = path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")
    wal.write_bytes(b"")
    shm.write_bytes(b"")
    path.chmod(0o644)
    wal.chmod(0o666)
    shm.chmod(0o604)
    with structlog.testing.capture_logs() as logs:
        again = Db.sqlite(path)
    try:
        assert {p.name: mode(p) for p in (path, wal, shm)} == {
            p.name: 0o600 for p in (path, wal, shm)
        }
        assert again.all("SELECT k FROM t") == []
    finally:
        again.close()
    made_private = [e["path"] for e in logs if e["event"] == "database file made private"]
    assert sorted(made_private) == sorted(str(p) for p in (path, wal, shm))


def test_only_group_and_other_bits_are_taken_from_an_existing_file(tmp_path: Path):
    path = tmp_path / "a.sqlite3"
    Db.sqlite(path).close()
    path.chmod(0o640)
    Db.sqlite(path).close()
    assert mode(path) == 0o600
    path.chmod(0o440)  # an owner who made it read-only keeps it so
    with suppress(sqlite3.OperationalError):  # not root: WAL mode needs to write
        Db.sqlite(path).close()
    assert mode(path) == 0o400


def test_an_existing_directory_open_to_others_is_left_as_it_is_with_a_warning(tmp_path: Path):
    """Not ours to change (it may be /srv or a shared mount): the operator is told instead."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    with structlog.testing.capture_logs() as logs:
        Db.sqlite(shared / "a.sqlite3").close()
    assert mode(shared) == 0o755
    assert mode(shared / "a.sqlite3") == 0o600
    (warning,) = [e for e in logs if e["log_level"] == "warning"]
    assert warning["event"] == "database directory is open to other users"
    assert (warning["directory"], warning["mode"]) == (str(shared), "0o755")
    shared.chmod(0o750)  # group, not world: no warning
    with structlog.testing.capture_logs() as logs:
        Db.sqlite(shared / "a.sqlite3").close()
    assert [e for e in logs if e["log_level"] == "warning"] == []


def test_a_db_may_be_used_from_another_thread(tmp_path: Path):
    db = Db.sqlite(tmp_path / "a.sqlite3")
    db.script(SCHEMA)
    failures: list[BaseException] = []

    def insert() -> None:
        try:
            db.execute("INSERT INTO t VALUES ('thread', 1)")
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    worker = threading.Thread(target=insert)
    worker.start()
    worker.join()
    try:
        assert failures == []
        assert db.one("SELECT count(*) FROM t") == (1,)
    finally:
        db.close()


# --- utc_text --------------------------------------------------------------------------


def test_utc_text_refuses_a_naive_datetime():
    with pytest.raises(ValueError, match="naive"):
        utc_text(datetime(2026, 11, 28, 8, 0))


def test_utc_text_converts_to_utc_with_microseconds():
    shanghai = datetime(2026, 11, 28, 8, 0, tzinfo=ZoneInfo("Asia/Shanghai"))
    assert utc_text(shanghai) == "2026-11-28T00:00:00.000000+00:00"
    assert utc_text(datetime(2026, 11, 28, 0, 0, 0, 1, tzinfo=UTC)) == (
        "2026-11-28T00:00:00.000001+00:00"
    )


def test_the_same_instant_in_any_zone_gives_the_same_text():
    instant = datetime(2026, 11, 28, 15, 30, 12, 345678, tzinfo=UTC)
    zones = [
        timezone(timedelta(hours=-5)),
        ZoneInfo("Asia/Shanghai"),
        timezone(timedelta(hours=14)),
    ]
    assert {utc_text(instant.astimezone(z)) for z in zones} == {utc_text(instant)}


def test_utc_text_sorts_like_the_instants_whatever_their_zones():
    base = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    zones = [timezone(timedelta(hours=h)) for h in (-11, -3, 0, 5, 8, 14)]
    instants = [
        (base + timedelta(minutes=37 * i, microseconds=i)).astimezone(zones[i % len(zones)])
        for i in range(40)
    ]
    shuffled = instants[7:] + instants[:7]
    assert sorted(shuffled, key=utc_text) == sorted(shuffled)


# --- Db on SQLite ------------------------------------------------------------------------


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.sqlite3"


@pytest.fixture
def sdb(sqlite_path: Path) -> Iterator[Db]:
    db = Db.open(sqlite_path, None)
    db.script(SCHEMA)
    try:
        yield db
    finally:
        db.close()


def _read_elsewhere(path: Path, sql: str) -> list[tuple[object, ...]]:
    """Read through a connection of its own: only committed rows are visible."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_db_open_needs_a_path_or_a_url():
    with pytest.raises(ConfigError, match="needs a path"):
        Db.open(None, None)
    with pytest.raises(ConfigError, match="needs a path"):
        Db.open(None, "")


def test_db_open_without_url_is_sqlite_in_schema_main(sdb: Db, sqlite_path: Path):
    assert sdb.dialect == "sqlite"
    assert sdb.schema() == "main"
    assert sqlite_path.is_file()


def test_a_write_is_committed_when_the_block_ends(sdb: Db, sqlite_path: Path):
    with sdb.write():
        sdb.execute("INSERT INTO t VALUES (?, ?)", ("a", 1))
        assert _read_elsewhere(sqlite_path, "SELECT k FROM t") == []  # not yet
    assert _read_elsewhere(sqlite_path, "SELECT k, v FROM t") == [("a", 1)]


def test_an_exception_in_a_write_rolls_it_back_and_propagates(sdb: Db, sqlite_path: Path):
    with pytest.raises(RuntimeError, match="boom"), sdb.write():
        sdb.execute("INSERT INTO t VALUES (?, ?)", ("a", 1))
        raise RuntimeError("boom")
    assert sdb.all("SELECT k FROM t") == []
    assert _read_elsewhere(sqlite_path, "SELECT k FROM t") == []


def test_a_keyboard_interrupt_in_a_write_also_rolls_back(sdb: Db):
    with pytest.raises(KeyboardInterrupt), sdb.write():
        sdb.execute("INSERT INTO t VALUES (?, ?)", ("a", 1))
        raise KeyboardInterrupt
    assert sdb.all("SELECT k FROM t") == []


def test_after_a_failed_write_the_next_write_is_a_transaction_of_its_own(
    sdb: Db, sqlite_path: Path
):
    """The failure leaves no half-open state: the next write begins and commits normally."""
    with pytest.raises(ValueError), sdb.write():
        raise ValueError
    with sdb.write():
        sdb.execute("INSERT INTO t VALUES (?, ?)", ("b", 2))
    assert _read_elsewhere(sqlite_path, "SELECT k FROM t") == [("b",)]


def test_a_nested_write_joins_the_outer_transaction(sdb: Db, sqlite_path: Path):
    with sdb.write():
        with sdb.write():
            sdb.execute("INSERT INTO t VALUES (?, ?)", ("inner", 1))
        assert _read_elsewhere(sqlite_path, "SELECT k FROM t") == []  # not committed by inner
        sdb.execute("INSERT INTO t VALUES (?, ?)", ("outer", 2))
    assert sorted(_read_elsewhere(sqlite_path, "SELECT k FROM t")) == [("inner",), ("outer",)]


def test_a_failure_after_a_nested_write_rolls_the_nested_rows_back_too(sdb: Db):
    with pytest.raises(RuntimeError), sdb.write():
        with sdb.write():
            sdb.execute("INSERT INTO t VALUES (?, ?)", ("inner", 1))
        raise RuntimeError
    assert sdb.all("SELECT k FROM t") == []


def test_writes_from_several_threads_are_serialised(sdb: Db):
    """Read-modify-write inside write() is atomic: no increment is lost, no BEGIN collides."""
    sdb.execute("INSERT INTO t VALUES ('n', 0)")
    failures: list[BaseException] = []

    def bump() -> None:
        try:
            for _ in range(25):
                with sdb.write():
                    row = sdb.one("SELECT v FROM t WHERE k = ?", ("n",))
                    assert row is not None
                    sdb.execute("UPDATE t SET v = ? WHERE k = ?", (row[0] + 1, "n"))
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert failures == []
    assert sdb.one("SELECT v FROM t WHERE k = 'n'") == (100,)


def test_execute_returns_the_number_of_rows_changed(sdb: Db):
    assert sdb.execute("INSERT INTO t VALUES (?, ?)", ["a", 1]) == 1
    sdb.execute("INSERT INTO t VALUES (?, ?)", ("b", 1))
    assert sdb.execute("UPDATE t SET v = v + 1 WHERE v = ?", (1,)) == 2
    assert sdb.execute("DELETE FROM t WHERE k = ?", ("zzz",)) == 0


def test_one_and_all_return_tuples_or_none(sdb: Db):
    assert sdb.one("SELECT v FROM t WHERE k = ?", ("a",)) is None
    assert sdb.all("SELECT k FROM t") == []
    sdb.executemany("INSERT INTO t VALUES (?, ?)", [("a", 1), ("b", 2)])
    assert sdb.one("SELECT k, v FROM t WHERE k = ?", ("b",)) == ("b", 2)
    assert sdb.all("SELECT k, v FROM t ORDER BY k") == [("a", 1), ("b", 2)]


def test_placeholders_bind_values_literally(sdb: Db):
    """A value holding SQL or a question mark is data, not part of the statement."""
    tricky = "x'); DROP TABLE t; --?"
    sdb.execute("INSERT INTO t VALUES (?, ?)", (tricky, 1))
    assert sdb.one("SELECT k FROM t WHERE v = ?", (1,)) == (tricky,)


def test_executemany_of_no_rows_does_nothing(sdb: Db):
    sdb.executemany("INSERT INTO t VALUES (?, ?)", [])
    assert sdb.all("SELECT * FROM t") == []


def test_stream_yields_rows_in_blocks_of_the_given_size(sdb: Db):
    sdb.executemany("INSERT INTO t VALUES (?, ?)", [(f"k{i}", i) for i in range(5)])
    blocks = list(sdb.stream("SELECT v FROM t WHERE v >= ? ORDER BY v", (0,), size=2))
    assert blocks == [[(0,), (1,)], [(2,), (3,)], [(4,)]]
    assert list(sdb.stream("SELECT v FROM t WHERE v > ?", (99,))) == []


def test_script_runs_every_statement_and_may_run_again(sdb: Db):
    ddl = "CREATE TABLE IF NOT EXISTS a (x TEXT); ; CREATE TABLE IF NOT EXISTS b (y TEXT);"
    sdb.script(ddl)
    sdb.script(ddl)
    names = {r[0] for r in sdb.all("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"a", "b", "t"} <= names


def test_lock_trips_inside_a_write_is_harmless_on_sqlite(sdb: Db, sqlite_path: Path):
    """BEGIN IMMEDIATE already holds the write lock; there is no trips table to lock."""
    with sdb.write():
        sdb.lock_trips()
        sdb.execute("INSERT INTO t VALUES (?, ?)", ("a", 1))
    assert _read_elsewhere(sqlite_path, "SELECT k FROM t") == [("a",)]


# --- Db on PostgreSQL --------------------------------------------------------------------


@pytest.mark.parametrize(
    "schema",
    ["", "Yikatong", "1district", "yk-test", "yk test", "yk;drop", "public.x", "a" * 64, "ÿk"],
)
def test_an_invalid_schema_name_is_refused_before_connecting(schema: str):
    """The schema is put into SQL text, so only a plain lower-case identifier may pass."""
    with pytest.raises(ConfigError, match="lower-case SQL identifier"):
        Db.open(None, "postgresql://nobody@127.0.0.1:1/none", schema)


def test_an_unreachable_postgres_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot reach the ledger database"):
        Db.open(None, "postgresql://nobody@127.0.0.1:1/none", "yk_unreachable")


@pytest.fixture
def pg_schema(postgres_url: str) -> Iterator[str]:
    import psycopg

    schema = f"yk_test_{secrets.token_hex(4)}"
    try:
        yield schema
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture
def pdb(postgres_url: str, pg_schema: str) -> Iterator[Db]:
    db = Db.open(None, postgres_url, pg_schema)
    db.script(SCHEMA)
    try:
        yield db
    finally:
        db.close()


def _pg_read(url: str, schema: str, sql: str) -> list[tuple[object, ...]]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"SET search_path TO {schema}")
        return [tuple(r) for r in conn.execute(sql).fetchall()]


def test_db_open_with_a_url_works_in_its_own_schema(pdb: Db, postgres_url: str, pg_schema: str):
    assert pdb.dialect == "postgres"
    assert pdb.schema() == pg_schema
    tables = _pg_read(
        postgres_url,
        "public",
        f"SELECT table_name FROM information_schema.tables WHERE table_schema = '{pg_schema}'",
    )
    assert tables == [("t",)]


def test_opening_the_same_schema_again_keeps_its_rows(pdb: Db, postgres_url: str, pg_schema: str):
    pdb.execute("INSERT INTO t VALUES (?, ?)", ("a", 1))
    again = Db.open(None, postgres_url, pg_schema)
    try:
        again.script(SCHEMA)
        assert again.all("SELECT k, v FROM t") == [("a", 1)]
    finally:
        again.close()


def test_a_postgres_write_commits_when_the_block_ends(pdb: Db, postgres_url: str, pg_schema: str):
    with pdb.write():
        pdb.execute("INSERT INTO t VALUES (?, ?)", ("a", 1))
        assert _pg_read(postgres_url, pg_schema, "SELECT k FROM t") == []
    assert _pg_read(postgres_url, pg_schema, "SELECT k, v FROM t") == [("a", 1)]


def test_a_postgres_write_rolls_back_on_an_exception(pdb: Db, postgres_url: str, pg_schema: str):
    with pytest.raises(RuntimeError, match="boom"), pdb.write():
        pdb.execute("INSERT INTO t VALUES (?, ?)", ("a", 1))
        with pdb.write():
            pdb.execute("INSERT INTO t VALUES (?, ?)", ("nested", 2))
        raise RuntimeError("boom")
    assert _pg_read(postgres_url, pg_schema, "SELECT k FROM t") == []
    with pdb.write():  # and the connection is usable again
        pdb.execute("INSERT INTO t VALUES (?, ?)", ("b", 2))
    assert _pg_read(postgres_url, pg_schema, "SELECT k FROM t") == [("b",)]


def test_postgres_placeholders_and_results_match_sqlite(pdb: Db):
    """Statements are written once with ``?``; the answers have the same shape as SQLite's."""
    tricky = "what? it's 100%"
    assert pdb.execute("INSERT INTO t VALUES (?, ?)", (tricky, 1)) == 1
    pdb.executemany("INSERT INTO t VALUES (?, ?)", [("b", 2), ("c", 3)])
    pdb.executemany("INSERT INTO t VALUES (?, ?)", [])
    assert pdb.one("SELECT k FROM t WHERE v = ?", (1,)) == (tricky,)
    assert pdb.one("SELECT k FROM t WHERE v = ?", (99,)) is None
    assert pdb.all("SELECT k, v FROM t WHERE v > ? ORDER BY v", (1,)) == [("b", 2), ("c", 3)]
    assert pdb.execute("UPDATE t SET v = v + 10 WHERE v >= ?", (2,)) == 2


def test_postgres_stream_reads_in_blocks_while_this_connection_writes(pdb: Db):
    pdb.executemany("INSERT INTO t VALUES (?, ?)", [(f"k{i}", i) for i in range(5)])
    blocks = []
    for block in pdb.stream("SELECT v FROM t WHERE v >= ? ORDER BY v", (0,), size=2):
        blocks.append(block)
        with pdb.write():
            pdb.execute("INSERT INTO t VALUES (?, ?)", (f"new{len(blocks)}", 100 + len(blocks)))
    assert blocks == [[(0,), (1,)], [(2,), (3,)], [(4,)]]
    assert pdb.one("SELECT count(*) FROM t WHERE v >= 100") == (3,)


def test_lock_trips_inside_a_postgres_write(pdb: Db):
    pdb.script("CREATE TABLE IF NOT EXISTS trips (id BIGINT)")
    with pdb.write():
        pdb.lock_trips()
        pdb.execute("INSERT INTO trips VALUES (?)", (1,))
    assert pdb.all("SELECT id FROM trips") == [(1,)]


# --- locks between processes and replicas ------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def two_dbs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Db, Db]]:
    """Two connections to one database, as two processes (replicas) would hold."""
    if request.param == "sqlite":
        a, b = Db.sqlite(tmp_path / "x.sqlite3"), Db.sqlite(tmp_path / "x.sqlite3")
    else:
        url, schema = request.getfixturevalue("postgres_url"), request.getfixturevalue("pg_schema")
        a, b = Db.open(None, url, schema), Db.open(None, url, schema)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _lock_in_child(db_file: Path, name: str, done: Path) -> subprocess.Popen[str]:
    """A process that holds ``name`` of a SQLite file until ``done`` exists."""
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from broker.core.db import Db\n"
        "db = Db.sqlite(Path(sys.argv[1]))\n"
        "with db.held(sys.argv[2]):\n"
        "    print('held', flush=True)\n"
        "    while not Path(sys.argv[3]).exists():\n"
        "        time.sleep(0.01)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(db_file), name, str(done)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdout.readline() == "held\n"
    return child


def test_a_held_lock_makes_another_process_wait_and_says_who_holds_it(
    two_dbs: tuple[Db, Db], tmp_path: Path
):
    a, b = two_dbs
    waits: list[str] = []
    entered = threading.Event()
    child = None
    holder: contextlib.AbstractContextManager[None]
    if a.dialect == "sqlite":  # POSIX locks are per process: the holder is another one
        child = _lock_in_child(tmp_path / "x.sqlite3", "close/2024-05-01", tmp_path / "done")
        holder = contextlib.nullcontext()
    else:
        holder = a.held("close/2024-05-01")
    with holder:

        def second() -> None:
            with b.held("close/2024-05-01", waits.append):
                entered.set()

        t = threading.Thread(target=second)
        t.start()
        deadline = time.monotonic() + 10
        while not waits and time.monotonic() < deadline:  # told, then waiting
            time.sleep(0.01)
        assert not entered.is_set()
        if a.dialect == "postgres":
            assert "yikatong close/2024-05-01 (pid" in waits[0], waits
            assert "PostgreSQL pid" in waits[0]
        else:
            assert "another process on this host" in waits[0]
        if child is not None:
            (tmp_path / "done").touch()
            assert child.wait(timeout=10) == 0
            assert child.stdout is not None
            child.stdout.close()
    t.join(timeout=10)
    assert entered.is_set() and len(waits) == 1


def test_locks_of_other_names_do_not_wait_for_each_other(two_dbs: tuple[Db, Db]):
    a, b = two_dbs
    told: list[str] = []
    with a.held("close/2024-05-01"), b.held("close/2024-05-02", told.append):
        pass
    assert told == []


def test_a_lock_for_a_transaction_waits_for_the_other_transaction_to_end(
    pdb: Db, postgres_url: str, pg_schema: str
):
    """PostgreSQL: the second replica's transaction waits at the lock until the first commits."""
    other = Db.open(None, postgres_url, pg_schema)
    other_pid = other.one("SELECT pg_backend_pid()")
    order: list[str] = []
    try:
        with pdb.write():
            pdb.lock_for_transaction("verify/512021")

            def second() -> None:
                with other.write():
                    other.lock_for_transaction("verify/512021")
                    order.append("second")

            t = threading.Thread(target=second)
            t.start()
            _wait_for_lock_wait(postgres_url, other_pid[0] if other_pid else 0)
            order.append("first")
        t.join(timeout=10)
        assert order == ["first", "second"]
    finally:
        other.close()


def test_a_lock_for_a_transaction_is_harmless_on_sqlite(sdb: Db):
    with sdb.write():
        sdb.lock_for_transaction("verify/512021")
        sdb.execute("INSERT INTO t VALUES (?, ?)", ("a", 1))
    assert sdb.all("SELECT k FROM t") == [("a",)]


def _wait_for_lock_wait(url: str, pid: int) -> None:
    """Until the session of backend ``pid`` waits for an advisory lock."""
    import psycopg

    deadline = time.monotonic() + 10
    with psycopg.connect(url, autocommit=True) as conn:
        while not conn.execute(
            "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock' "
            "AND wait_event = 'advisory'",
            (pid,),
        ).fetchone():
            assert time.monotonic() < deadline, "nobody waits for the lock"
            time.sleep(0.01)


# --- placeholders ----------------------------------------------------------------------


def test_postgres_placeholders_leave_question_marks_in_literals_alone():
    from broker.core.db import postgres_placeholders

    sql = "SELECT '?' || ?, 'it''s ?%', 5 % 2 FROM t WHERE k = ?"
    assert postgres_placeholders(sql) == "SELECT '?' || %s, 'it''s ?%%', 5 %% 2 FROM t WHERE k = %s"


def test_literals_with_question_marks_and_percent_read_back_on_postgres(pdb: Db):
    assert pdb.one("SELECT '?' || ?, 'it''s ?%', 7 % 4", ("x",)) == ("?x", "it's ?%", 3)
    assert pdb.one("SELECT 'a%b'") == ("a%b",)


# --- migrations ------------------------------------------------------------------------

STEPS = (
    Migration(1, "first table", "CREATE TABLE IF NOT EXISTS m1 (k TEXT PRIMARY KEY)"),
    Migration(
        2,
        "a column and an index",
        "ALTER TABLE m1 ADD COLUMN note TEXT; CREATE INDEX IF NOT EXISTS m1_note ON m1 (note)",
    ),
    Migration(
        3,
        "a second table, typed per dialect",
        "CREATE TABLE IF NOT EXISTS m3 (at TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS m3 (at timestamptz NOT NULL)",
    ),
)


@pytest.fixture(params=["sqlite", "postgres"])
def mdb(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    if request.param == "sqlite":
        db = Db.sqlite(tmp_path / "m.sqlite3")
    else:
        url = request.getfixturevalue("postgres_url")
        db = Db.postgres(url, request.getfixturevalue("pg_schema"))
    try:
        yield db
    finally:
        db.close()


def _applied(db: Db, component: str = "c") -> list[tuple[int, str]]:
    return [
        (int(v), str(n))
        for v, n in db.all(
            "SELECT version, name FROM schema_migrations WHERE component = ? ORDER BY version",
            (component,),
        )
    ]


@pytest.mark.parametrize(
    "sql",
    [
        "DROP TABLE t",
        "ALTER TABLE t RENAME TO u",
        "ALTER TABLE t ALTER COLUMN v TYPE TEXT",
        "DELETE FROM t",
        "TRUNCATE t",
        "CREATE TABLE a (x TEXT); drop index b",
    ],
)
def test_a_migration_that_is_not_additive_is_refused_when_defined(sql: str):
    with pytest.raises(ValueError, match="not additive"):
        Migration(1, "bad", sql)
    with pytest.raises(ValueError, match="not additive"):
        Migration(1, "bad on postgres only", "CREATE TABLE a (x TEXT)", sql)


def test_migrations_apply_in_order_and_are_recorded(mdb: Db):
    assert schema_version(mdb, "c") == 0
    assert migrate(mdb, "c", STEPS) == 3
    assert _applied(mdb) == [(1, "first table"), (2, "a column and an index"), (3, STEPS[2].name)]
    mdb.execute("INSERT INTO m1 (k, note) VALUES ('a', 'b')")
    assert mdb.one("SELECT k, note FROM m1") == ("a", "b")


def test_a_second_migrate_changes_nothing(mdb: Db):
    migrate(mdb, "c", STEPS)
    before = mdb.all("SELECT component, version, name, applied_at FROM schema_migrations")
    assert migrate(mdb, "c", STEPS) == 3
    assert mdb.all("SELECT component, version, name, applied_at FROM schema_migrations") == before


def test_components_are_versioned_apart(mdb: Db):
    migrate(mdb, "c", STEPS[:1])
    assert migrate(mdb, "other", (Migration(1, "x", "CREATE TABLE IF NOT EXISTS x (y TEXT)"),))
    assert schema_version(mdb, "c") == 1
    assert schema_version(mdb, "other") == 1


def test_a_later_release_goes_on_from_the_version_it_finds(mdb: Db):
    assert migrate(mdb, "c", STEPS[:1]) == 1  # the previous release
    mdb.execute("INSERT INTO m1 (k) VALUES ('kept')")
    assert migrate(mdb, "c", STEPS) == 3  # this one
    assert mdb.all("SELECT k, note FROM m1") == [("kept", None)]


def test_a_failing_step_rolls_back_alone_and_the_next_open_retries_it(mdb: Db):
    broken = (*STEPS[:1], Migration(2, "broken", "CREATE TABLE IF NOT EXISTS m2 (k TEXT); SELEC"))
    with pytest.raises(Exception):  # noqa: B017 - the database's own syntax error
        migrate(mdb, "c", broken)
    assert schema_version(mdb, "c") == 1  # step 1 stays, step 2 left nothing behind
    tables = (
        mdb.all("SELECT name FROM sqlite_master WHERE name = 'm2'")
        if mdb.dialect == "sqlite"
        else mdb.all("SELECT to_regclass('m2') WHERE to_regclass('m2') IS NOT NULL")
    )
    assert tables == []
    assert migrate(mdb, "c", STEPS) == 3


def test_a_database_newer_than_the_code_is_opened_as_it_is(mdb: Db):
    migrate(mdb, "c", STEPS)  # a newer release migrated it to 3
    with structlog.testing.capture_logs() as logs:
        assert migrate(mdb, "c", STEPS[:2]) == 3  # this release knows 2
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "database schema is newer than this release"
    ]
    assert _applied(mdb)[-1][0] == 3


@pytest.mark.parametrize("versions", [(1, 3), (2,), (1, 1)])
def test_migrations_must_be_numbered_from_one_without_gaps(mdb: Db, versions: tuple[int, ...]):
    steps = [Migration(v, f"v{v}", "CREATE TABLE IF NOT EXISTS g (x TEXT)") for v in versions]
    with pytest.raises(ValueError, match="numbered"):
        migrate(mdb, "c", steps)


def test_two_replicas_migrating_one_postgres_schema_at_once_apply_each_step_once(
    postgres_url: str, pg_schema: str
):
    slow = (
        *STEPS,
        Migration(
            4,
            "slow",
            "CREATE TABLE IF NOT EXISTS m4 (x TEXT)",
            "CREATE TABLE IF NOT EXISTS m4 AS SELECT pg_sleep(0.3)::text AS x",
        ),
    )
    errors: list[BaseException] = []
    versions: list[int] = []

    def replica() -> None:
        db = Db.postgres(postgres_url, pg_schema)
        try:
            versions.append(migrate(db, "c", slow))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            db.close()

    threads = [threading.Thread(target=replica) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert versions == [4, 4]
    rows = _pg_read(postgres_url, pg_schema, "SELECT version FROM schema_migrations ORDER BY 1")
    assert rows == [(1,), (2,), (3,), (4,)]


def test_a_snapshot_reads_one_state_while_another_connection_writes(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    reader, writer = Db.sqlite(path), Db.sqlite(path)
    try:
        writer.script("CREATE TABLE t (x INTEGER)")
        with writer.write():
            writer.execute("INSERT INTO t VALUES (1)")
        with reader.snapshot():
            first = reader.one("SELECT count(*) FROM t")
            with writer.write():  # another connection commits meanwhile: no lock is held
                writer.execute("INSERT INTO t VALUES (2)")
            again = reader.one("SELECT count(*) FROM t")
        assert first == again == (1,)
        assert reader.one("SELECT count(*) FROM t") == (2,)
    finally:
        reader.close()
        writer.close()
