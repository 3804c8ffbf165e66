"""Databases written by the previous schema release open with today's code, every row readable.

``tests/fixtures/db-v0/`` holds Dazu's registry, ledger and clearing databases after a
settlement day, as the code before versioned migrations wrote them
(``scripts/make-db-fixtures``, run once): SQLite files and a ``pg_dump`` of the
PostgreSQL ledger schema, with the rows per table in ``manifest.json``. Districts
upgrade running databases; these tests are what keeps an upgrade from losing a row.
"""

from __future__ import annotations

import json
import secrets
import shutil
import sqlite3
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import psycopg
import pytest

from broker.cards.config import PrivacyConfig, RegistryConfig
from broker.cards.registry import Registry
from broker.core.db import Db, schema_version
from broker.node.config import NodeConfig
from broker.settlement.clearing.positions import positions
from broker.settlement.clearing.store import ClearingStore
from broker.settlement.config import LedgerConfig
from broker.settlement.ledger import open_ledger
from broker.trust.config import TLSConfig
from tests.e2e import previous_release
from tests.helpers import registry_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "db-v0"
MANIFEST: dict[str, dict[str, int]] = json.loads((FIXTURES / "manifest.json").read_text())
DAZU = "500111"
SQLITE_FILES = ("registry.sqlite3", "ledger.sqlite3", "ledger-clearing.sqlite3")


def config(root: Path, ledger: LedgerConfig) -> NodeConfig:
    return NodeConfig(
        district=DAZU,
        listen="127.0.0.1:0",
        tls=TLSConfig(root / "ca.pem", root / "node.pem", root / "node.key", root / "crl.pem"),
        registry=RegistryConfig(root / "registry.sqlite3"),
        privacy=PrivacyConfig(root / "hash.key"),
        ledger=ledger,
    )


Columns = dict[str, list[str]]  # table → its columns, in order


def _select(table: str, columns: Columns | None) -> str:
    """``*``, or the columns a table had before a migration (added columns are allowed: every
    column the previous release wrote must keep its values)."""
    return ", ".join(columns[table]) if columns and table in columns else "*"


def sqlite_columns(path: Path) -> Columns:
    db = sqlite3.connect(path)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: [r[1] for r in db.execute(f"PRAGMA table_info({t})")] for t in tables}
    finally:
        db.close()


def sqlite_rows(path: Path, columns: Columns | None = None) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table (of ``columns`` only, where given), in a stable order, read
    with plain sqlite3."""
    db = sqlite3.connect(path)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {
            t: sorted(db.execute(f"SELECT {_select(t, columns)} FROM {t}"), key=repr)
            for t in sorted(tables)
        }
    finally:
        db.close()


def postgres_columns(url: str, schema: str) -> Columns:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = %s ORDER BY table_name, ordinal_position",
            (schema,),
        ).fetchall()
    out: Columns = {}
    for table, column in rows:
        out.setdefault(str(table), []).append(str(column))
    return out


def postgres_rows(
    url: str, schema: str, columns: Columns | None = None
) -> dict[str, list[tuple[Any, ...]]]:
    with psycopg.connect(url) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                (schema,),
            )
        ]
        return {
            t: sorted(
                conn.execute(f"SELECT {_select(t, columns)} FROM {schema}.{t}").fetchall(),
                key=repr,
            )
            for t in sorted(tables)
        }


def counts(rows: dict[str, list[tuple[Any, ...]]]) -> dict[str, int]:
    return {t: len(r) for t, r in rows.items()}


def open_everything(cfg: NodeConfig) -> dict[str, int]:
    """Open each database the way a node does, and read every row through the code's own API."""
    numbers = [r[0] for r in sqlite_rows(registry_file(cfg))["cards"]]  # card_number first
    registry = Registry(cfg.registry)
    try:
        assert all(registry.lookup(n) is not None for n in numbers)
        read = {"cards": len(numbers), "districts": len(registry.districts())}
    finally:
        registry.close()
    ledger = open_ledger(cfg.ledger.path, cfg.ledger.url, cfg.ledger.schema)
    store = ClearingStore.open(cfg)
    try:
        trips = store.trips.all("SELECT operator_id, trip_id, settlement_day FROM trips")
        assert all(ledger.outcome(op, trip) is not None for op, trip, _ in trips)
        periods = sorted({date.fromisoformat(str(day)) for _, _, day in trips})
        read["trips"] = len(trips)
        read["accepted"] = sum(len(ledger.accepted_trips(p)) for p in periods)
        read["out_batches"] = sum(len(store.out_batches(p)) for p in periods)
        read["settled_positions"] = sum(
            p.state == "settled" for day in periods for p in positions(store, day, DAZU)
        )
    finally:
        store.close()
        ledger.close()
    return read


@pytest.fixture
def sqlite_copy(tmp_path: Path) -> NodeConfig:
    for name in SQLITE_FILES:
        shutil.copyfile(FIXTURES / name, tmp_path / name)
    return config(tmp_path, LedgerConfig(path=tmp_path / "ledger.sqlite3"))


@pytest.fixture
def postgres_copy(postgres_url: str, tmp_path: Path) -> Iterator[tuple[NodeConfig, str]]:
    schema = f"yk_fx_{secrets.token_hex(4)}"
    dump = (FIXTURES / "ledger.postgres.sql").read_text().replace("fx_500111", schema)
    script = "\n".join(line for line in dump.splitlines() if not line.startswith("\\"))
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(script)  # a pg_dump: many statements, no parameters
    try:
        sqlite_part = tmp_path / "registry.sqlite3"
        shutil.copyfile(FIXTURES / "registry.sqlite3", sqlite_part)
        yield config(tmp_path, LedgerConfig(url=postgres_url, schema=schema)), schema
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def test_the_fixtures_hold_a_whole_settlement_day():
    """Guards the tests below against passing on empty files."""
    ledger, clearing = MANIFEST["ledger.sqlite3"], MANIFEST["ledger-clearing.sqlite3"]
    assert ledger["trips"] > 0 and clearing["in_lines"] > 0 and clearing["positions"] > 0
    assert MANIFEST["registry.sqlite3"]["cards"] > 0


def test_sqlite_databases_of_the_previous_release_open_and_every_row_reads(
    sqlite_copy: NodeConfig,
):
    root = registry_file(sqlite_copy).parent
    before = {name: sqlite_rows(root / name) for name in SQLITE_FILES}
    columns = {name: sqlite_columns(root / name) for name in SQLITE_FILES}
    assert {name: counts(rows) for name, rows in before.items()} == {
        name: MANIFEST[name] for name in SQLITE_FILES
    }
    read = open_everything(sqlite_copy)
    assert read["cards"] == MANIFEST["registry.sqlite3"]["cards"]
    assert read["trips"] == MANIFEST["ledger.sqlite3"]["trips"]
    assert read["out_batches"] == MANIFEST["ledger-clearing.sqlite3"]["out_batches"]
    assert read["settled_positions"] == MANIFEST["ledger-clearing.sqlite3"]["positions"]
    after_first = {name: sqlite_rows(root / name, columns[name]) for name in SQLITE_FILES}
    for name, tables in before.items():  # nothing the previous release wrote is lost
        for table, rows in tables.items():
            assert after_first[name][table] == rows, f"{name}:{table}"
    open_everything(sqlite_copy)
    assert {name: sqlite_rows(root / name, columns[name]) for name in SQLITE_FILES} == after_first


def test_a_postgresql_ledger_of_the_previous_release_opens_and_every_row_reads(
    postgres_copy: tuple[NodeConfig, str], postgres_url: str
):
    cfg, schema = postgres_copy
    before = postgres_rows(postgres_url, schema)
    columns = postgres_columns(postgres_url, schema)
    assert counts(before) == MANIFEST["ledger.postgres.sql"]
    read = open_everything(cfg)
    assert read["trips"] == MANIFEST["ledger.postgres.sql"]["trips"]
    assert read["out_batches"] == MANIFEST["ledger.postgres.sql"]["out_batches"]
    assert read["settled_positions"] == MANIFEST["ledger.postgres.sql"]["positions"]
    after_first = postgres_rows(postgres_url, schema, columns)
    for table, rows in before.items():  # every column it wrote keeps its values
        assert after_first[table] == rows, table
    open_everything(cfg)
    assert postgres_rows(postgres_url, schema, columns) == after_first


# ---------------------------------------------------------------- the previous release, after

# Run by the previous release's code (tests/e2e/previous_release.py) on a database this
# release has migrated: open it as a node does, read every row through that release's API,
# record one more trip, and print what it read. argv: root, ledger path or "", url, schema.
PREVIOUS_READER = """
import json, sys
from datetime import UTC, date, datetime
from pathlib import Path
from broker.cards.config import PrivacyConfig, RegistryConfig
from broker.cards.model import CardRef, Scene
from broker.cards.registry import Registry
from broker.node.config import NodeConfig
from broker.settlement.clearing.positions import positions
from broker.settlement.clearing.store import ClearingStore
from broker.settlement.config import LedgerConfig
from broker.settlement.ledger import open_ledger
from broker.settlement.trips import ACCEPT, Trip
from broker.trust.config import TLSConfig

root, path, url, schema = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
ledger_cfg = LedgerConfig(url=url, schema=schema) if url else LedgerConfig(path=Path(path))
cfg = NodeConfig(
    district="500111", listen="127.0.0.1:0",
    tls=TLSConfig(root / "ca.pem", root / "node.pem", root / "node.key"),
    registry=RegistryConfig(root / "registry.sqlite3"), privacy=PrivacyConfig(root / "hash.key"),
    ledger=ledger_cfg,
)
registry = Registry(cfg.registry.path)
numbers = [r[0] for r in registry._db.execute("SELECT card_number FROM cards").fetchall()]
read = {"cards": sum(registry.lookup(n) is not None for n in numbers),
        "districts": len(registry.districts())}
registry.close()
ledger = open_ledger(cfg.ledger.path, cfg.ledger.url, cfg.ledger.schema)
store = ClearingStore.open(cfg)
trips = store.trips.all("SELECT operator_id, trip_id, settlement_day FROM trips")
read["trips"] = sum(ledger.outcome(op, t) is not None for op, t, _ in trips)
periods = sorted({date.fromisoformat(str(d)) for _, _, d in trips})
read["out_batches"] = sum(len(store.out_batches(p)) for p in periods)
read["settled_positions"] = sum(
    p.state == "settled" for d in periods for p in positions(store, d, "500111"))
at = datetime(2027, 1, 5, 2, 0, tzinfo=UTC)
trip = Trip("bus-old", "written-by-the-previous-release", CardRef("512021", "SC0000001"),
            Scene.BUS, "line-1", at, 200, 200, 0, None, "v1")
read["recorded"] = ledger.record([(trip, ACCEPT)], at)[0].outcome.value
store.close()
ledger.close()
print(json.dumps(read))
"""


def read_by_previous_release(tree: Path, cfg: NodeConfig) -> dict[str, Any]:
    path = str(cfg.ledger.path or "")
    done = previous_release.run(
        tree,
        PREVIOUS_READER,
        str(registry_file(cfg).parent),
        path,
        cfg.ledger.url or "",
        cfg.ledger.schema,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def assert_read_whole(read: dict[str, Any], ledger_manifest: dict[str, int]) -> None:
    assert read["cards"] == MANIFEST["registry.sqlite3"]["cards"]
    assert read["trips"] == ledger_manifest["trips"]
    assert read["settled_positions"] == ledger_manifest["positions"]
    assert read["recorded"] == "accepted"


def test_the_previous_release_opens_migrated_sqlite_databases_and_reads_every_row(
    sqlite_copy: NodeConfig, previous_tree: Path
):
    root = registry_file(sqlite_copy).parent
    open_everything(sqlite_copy)  # this release migrates them
    for name, component in (
        ("registry.sqlite3", "registry"),
        ("ledger.sqlite3", "ledger"),
        ("ledger-clearing.sqlite3", "clearing"),
    ):
        db = Db.sqlite(root / name)
        try:
            assert schema_version(db, component) >= 1, name
        finally:
            db.close()
    read = read_by_previous_release(previous_tree, sqlite_copy)
    assert_read_whole(read, {**MANIFEST["ledger.sqlite3"], **MANIFEST["ledger-clearing.sqlite3"]})
    assert read["out_batches"] == MANIFEST["ledger-clearing.sqlite3"]["out_batches"]
    again = open_everything(sqlite_copy)  # and this release reads what the previous one wrote
    assert again["trips"] == MANIFEST["ledger.sqlite3"]["trips"] + 1


def test_the_previous_release_opens_a_migrated_postgresql_ledger_and_reads_every_row(
    postgres_copy: tuple[NodeConfig, str], previous_tree: Path, postgres_url: str
):
    cfg, schema = postgres_copy
    open_everything(cfg)
    db = Db.postgres(postgres_url, schema)
    try:
        assert schema_version(db, "ledger") >= 1 and schema_version(db, "clearing") >= 1
    finally:
        db.close()
    read = read_by_previous_release(previous_tree, cfg)
    assert_read_whole(read, MANIFEST["ledger.postgres.sql"])
    assert read["out_batches"] == MANIFEST["ledger.postgres.sql"]["out_batches"]
    again = open_everything(cfg)
    assert again["trips"] == MANIFEST["ledger.postgres.sql"]["trips"] + 1
