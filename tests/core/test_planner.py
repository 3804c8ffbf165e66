"""Planner statistics kept current by the writer: analyzed as the table doubles, on PostgreSQL
(a real server, each test in a schema of its own); nothing on SQLite."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.core.db import Db
from broker.core.planner import Statistics

TABLE = (
    "CREATE TABLE IF NOT EXISTS t (op TEXT NOT NULL, id TEXT NOT NULL, pad TEXT NOT NULL, "
    "PRIMARY KEY (op, id))"
)


@pytest.fixture
def pdb(postgres_url: str) -> Iterator[Db]:
    import psycopg

    schema = f"yk_plan_{secrets.token_hex(4)}"
    db = Db.open(None, postgres_url, schema)
    db.script(TABLE)
    try:
        yield db
    finally:
        db.close()
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def insert(db: Db, first: int, n: int) -> int:
    db.executemany(
        "INSERT INTO t (op, id, pad) VALUES (?, ?, ?)",
        [("OP1", f"trip-{i:08d}", "x" * 150) for i in range(first, first + n)],
    )
    return n


def planned_rows(db: Db) -> float:
    row = db.one("SELECT reltuples FROM pg_class WHERE oid = to_regclass('t')")
    assert row is not None
    return float(row[0])


def lookup_plan(db: Db, first: int) -> str:
    ids = [f"trip-{i:08d}" for i in range(first, first + 500)]
    marks = ", ".join("?" * len(ids))
    rows = db.all(f"EXPLAIN SELECT id FROM t WHERE op = ? AND id IN ({marks})", ("OP1", *ids))
    return "\n".join(str(r[0]) for r in rows)


def probes_each_id(plan: str) -> bool:
    """Whether the index is searched by id (not only by operator, every row then filtered)."""
    return any("Index Cond" in line and "id = ANY" in line for line in plan.splitlines())


def test_a_table_is_analyzed_once_its_growth_reaches_what_it_held(pdb: Db):
    stats = Statistics(pdb, "t", min_rows=1_000)
    assert not stats.grew(insert(pdb, 0, 999))
    assert planned_rows(pdb) <= 0  # never analyzed: the planner knows nothing of it
    assert stats.grew(insert(pdb, 999, 1))  # the 1,000th row
    assert planned_rows(pdb) == 1_000
    assert not stats.grew(insert(pdb, 1_000, 999))  # the table held 1,000: 1,000 more
    assert stats.grew(insert(pdb, 1_999, 1))
    assert planned_rows(pdb) == 2_000
    assert not stats.grew(0)
    assert stats.analyses == 2


def test_a_lookup_of_ids_probes_the_index_once_the_table_is_analyzed(pdb: Db):
    """The accident: a table that grew from empty without statistics is planned as tiny, and a
    lookup of 500 ids of one operator reads every row of that operator, filtered."""
    stats = Statistics(pdb, "t", min_rows=50_000)
    written = insert(pdb, 0, 50_000 - 1)
    assert not stats.grew(written)
    assert not probes_each_id(lookup_plan(pdb, 20_000))  # this server, without statistics
    assert stats.grew(insert(pdb, written, 1))
    assert probes_each_id(lookup_plan(pdb, 20_000)), lookup_plan(pdb, 20_000)


def test_inside_a_transaction_the_analysis_sees_the_rows_it_wrote(pdb: Db):
    stats = Statistics(pdb, "t", min_rows=2_000)
    with pdb.write():
        assert stats.grew(insert(pdb, 0, 2_000))
        assert planned_rows(pdb) == 2_000  # uncommitted, counted (and planned by) here


def test_a_new_writer_starts_from_what_the_statistics_already_count(pdb: Db):
    first = Statistics(pdb, "t", min_rows=100)
    assert first.grew(insert(pdb, 0, 3_000))
    again = Statistics(pdb, "t", min_rows=100)  # a restarted node: the table held 3,000
    assert not again.grew(insert(pdb, 3_000, 2_999))
    assert again.grew(insert(pdb, 5_999, 1))


def test_sqlite_is_never_analyzed(tmp_path: Path):
    db = Db.sqlite(tmp_path / "a.sqlite3")
    try:
        db.script(TABLE)
        stats = Statistics(db, "t", min_rows=1)
        assert not stats.grew(insert(db, 0, 10))
        assert stats.analyses == 0
        assert db.one("SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_stat1'") == (0,)
    finally:
        db.close()


def test_a_table_name_must_be_an_identifier(tmp_path: Path):
    db = Db.memory()
    try:
        for bad in ("t; DROP TABLE t", "T", "", "a-b"):
            with pytest.raises(ValueError, match="lower-case SQL identifier"):
                Statistics(db, bad)
    finally:
        db.close()
