"""The registry's tables are the same on SQLite and PostgreSQL, and every step is additive."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from broker.cards import handles
from broker.cards.registry_schema import MIGRATIONS
from broker.core.db import Db, Migration, migrate


@pytest.fixture
def pg(postgres_url: str) -> Iterator[Db]:
    schema = f"yk_schema_{secrets.token_hex(4)}"
    db = Db.postgres(postgres_url, schema, "registry")
    yield db
    db.close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def sqlite_columns(db: Db) -> dict[str, list[str]]:
    tables = [r[0] for r in db.all("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return {t: [str(r[1]) for r in db.all(f"PRAGMA table_info({t})")] for t in sorted(tables)}


def postgres_columns(db: Db) -> dict[str, list[str]]:
    rows = db.all(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position"
    )
    out: dict[str, list[str]] = {}
    for table, column in rows:
        out.setdefault(str(table), []).append(str(column))
    return out


@pytest.mark.parametrize(
    ("component", "steps"), [("registry", MIGRATIONS), ("handles", handles.MIGRATIONS)]
)
def test_both_databases_get_the_same_tables_and_columns(
    tmp_path: Path, pg: Db, component: str, steps: tuple[Migration, ...]
):
    lite = Db.sqlite(tmp_path / "r.sqlite3")
    try:
        assert migrate(lite, component, steps) == migrate(pg, component, steps) == len(steps)
        assert sqlite_columns(lite) == postgres_columns(pg)
        assert migrate(pg, component, steps) == len(steps)  # a second open changes nothing
    finally:
        lite.close()


def test_instants_sort_as_text_byte_by_byte_on_postgresql(pg: Db):
    """A locale's collation may weigh punctuation and case; UTC text must sort as written."""
    migrate(pg, "registry", MIGRATIONS)
    times = ["2026-01-10T02:00:00.000000+00:00", "2026-01-10T02:00:00.000001+00:00",
             "2026-01-10T10:00:00.000000+00:00", "2026-01-9T23:00:00.000000+00:00"]  # fmt: skip
    with pg.write():
        for i, at in enumerate(reversed(times)):
            pg.execute("INSERT INTO advertised_ttl (since, ttl_seconds) VALUES (?, ?)", (at, i))
    assert [r[0] for r in pg.all("SELECT since FROM advertised_ttl ORDER BY since")] == sorted(
        times
    )
