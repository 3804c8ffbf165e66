"""Database access: SQLite files (WAL, synchronous FULL), UTC text, and the Db wrapper.

The wrapper is exercised on SQLite and, through the ``postgres_url`` fixture, on PostgreSQL
in a schema of its own that is dropped afterwards.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from broker.core.db import Db, open_db, utc_text
from broker.core.errors import ConfigError

SCHEMA = "CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v BIGINT NOT NULL)"


# --- open_db ---------------------------------------------------------------------------


def test_open_db_uses_wal_full_sync_and_a_busy_timeout(tmp_path: Path):
    db = open_db(tmp_path / "a.sqlite3", SCHEMA)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert db.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    finally:
        db.close()


def test_open_db_creates_missing_directories_and_applies_the_schema(tmp_path: Path):
    path = tmp_path / "deep" / "er" / "ledger.sqlite3"
    db = open_db(path, SCHEMA + "; CREATE TABLE IF NOT EXISTS u (x TEXT)")
    try:
        assert path.is_file()
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"t", "u"} <= names
    finally:
        db.close()


def test_open_db_is_in_autocommit_mode(tmp_path: Path):
    """Without an explicit BEGIN a statement is committed at once: another reader sees it."""
    path = tmp_path / "a.sqlite3"
    db = open_db(path, SCHEMA)
    other = sqlite3.connect(path)
    try:
        db.execute("INSERT INTO t VALUES ('a', 1)")
        assert not db.in_transaction
        assert other.execute("SELECT v FROM t WHERE k = 'a'").fetchone() == (1,)
    finally:
        other.close()
        db.close()


def test_reopening_an_existing_file_keeps_its_rows(tmp_path: Path):
    path = tmp_path / "a.sqlite3"
    db = open_db(path, SCHEMA)
    db.execute("INSERT INTO t VALUES ('a', 1)")
    db.close()
    again = open_db(path, SCHEMA)
    try:
        assert again.execute("SELECT k, v FROM t").fetchall() == [("a", 1)]
    finally:
        again.close()


def test_an_open_db_connection_may_be_used_from_another_thread(tmp_path: Path):
    db = open_db(tmp_path / "a.sqlite3", SCHEMA)
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
        assert db.execute("SELECT count(*) FROM t").fetchone() == (1,)
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
