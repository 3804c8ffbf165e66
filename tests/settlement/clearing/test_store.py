"""The clearing tables (broker.settlement.clearing.store): where they live, meta, b64.

SQLite keeps them in a file of their own beside the ledger (trips read through a
second connection); PostgreSQL keeps them in the district's schema next to trips.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from broker.cards.model import CardRef, Entitlement, Scene
from broker.core.db import Db, migrate, schema_version
from broker.core.errors import ConfigError
from broker.node.config import NodeConfig, parse_config
from broker.settlement.clearing.store import (
    MIGRATIONS,
    ClearingStore,
    b64,
    clearing_path,
    unb64,
)
from broker.settlement.ledger import open_ledger
from broker.settlement.ledger.store import MIGRATIONS as LEDGER_MIGRATIONS
from broker.settlement.trips import ACCEPT, Trip
from broker.testbed.build import free_port

NOW = datetime(2026, 11, 28, 8, 0, tzinfo=UTC)


def node_config(tmp_path: Path, ledger: dict[str, str]) -> NodeConfig:
    doc: dict[str, Any] = {
        "district": "500111",
        "listen": "127.0.0.1:0",
        "tls": {
            "ca_file": "ca.pem",
            "cert_file": "node.pem",
            "key_file": "node.key",
            "crl_file": "crl.pem",
        },
        "registry": {"path": "registry.sqlite3"},
        "privacy": {"hash_key_file": "hash.key"},
        "ledger": ledger,
    }
    return parse_config(doc, tmp_path, env={})


def a_trip() -> Trip:
    return Trip(
        "bus-01",
        "t-1",
        CardRef("512021", "C5120210000001"),
        Scene.BUS,
        "",
        NOW - timedelta(minutes=5),
        200,
        0,
        200,
        Entitlement.SENIOR_65,
        "sample-1",
    )


@pytest.fixture
def pg_config(tmp_path: Path, postgres_url: str) -> Iterator[NodeConfig]:
    schema = f"yk_test_{secrets.token_hex(4)}"
    yield node_config(tmp_path, {"url": postgres_url, "schema": schema})
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgres"])
def config(request: pytest.FixtureRequest, tmp_path: Path) -> NodeConfig:
    if request.param == "postgres":
        cfg: NodeConfig = request.getfixturevalue("pg_config")
        return cfg
    return node_config(tmp_path, {"path": "var/ledger.sqlite3"})


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


# ---------------------------------------------------------------- where the tables live


def test_the_clearing_file_sits_beside_the_ledger():
    assert clearing_path(Path("/v/ledger.sqlite3")) == Path("/v/ledger-clearing.sqlite3")
    assert clearing_path(Path("/v/ledger.db")) == Path("/v/ledger-clearing.db")
    assert clearing_path(Path("/v/ledger")) == Path("/v/ledger-clearing")


def test_on_sqlite_the_tables_are_a_file_of_their_own_and_trips_are_read_from_the_ledger(
    tmp_path: Path,
):
    cfg = node_config(tmp_path, {"path": "var/ledger.sqlite3"})
    store = ClearingStore.open(cfg)  # creates the ledger too: trips exist to be read
    ledger_file, clearing_file = (
        tmp_path / "var/ledger.sqlite3",
        tmp_path / "var/ledger-clearing.sqlite3",
    )
    assert store.db is not store.trips
    assert store.db.dialect == store.trips.dialect == "sqlite"
    # and no clearing table (a sealed day is the ledger's: trip writes check it)
    assert tables(ledger_file) == {"trips", "sealed_days", "trip_gates", "schema_migrations"}
    assert {"out_batches", "disputes", "in_batches", "positions", "meta"} <= tables(clearing_file)
    assert "trips" not in tables(clearing_file)
    ledger = open_ledger(cfg.ledger.path, None)
    ledger.record([(a_trip(), ACCEPT)], NOW)
    ledger.close()
    assert store.trips.one("SELECT count(*) FROM trips") == (1,)  # the second connection sees it
    store.close()


def test_on_postgres_the_tables_sit_in_the_district_schema_beside_trips(pg_config: NodeConfig):
    store = ClearingStore.open(pg_config)
    assert store.db is store.trips and store.db.dialect == "postgres"
    assert store.db.schema() == pg_config.ledger.schema
    names = {
        str(n)
        for (n,) in store.db.all(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = ?",
            (pg_config.ledger.schema,),
        )
    }
    assert {"trips", "out_batches", "disputes", "in_batches", "positions", "meta"} <= names
    store.close()


def test_a_config_with_no_ledger_is_refused(tmp_path: Path):
    with pytest.raises(ConfigError, match="needs a path"):
        ClearingStore.open(node_config(tmp_path, {}))


def test_a_bad_postgres_schema_name_is_refused_before_connecting(tmp_path: Path):
    url = f"postgresql://nobody@127.0.0.1:{free_port()}/none"  # nothing listens there
    cfg = node_config(tmp_path, {"url": url, "schema": "Bad-Name"})
    with pytest.raises(ConfigError, match="lower-case SQL identifier"):
        ClearingStore.open(cfg)


# ---------------------------------------------------------------- the verifier's connection


def test_the_verifiers_sqlite_connection_has_a_bounded_cache_and_checkpoints_after_answering(
    tmp_path: Path,
):
    """A batch's commit leaves its pages in the write-ahead log (no checkpoint inside the
    commit, however big); :meth:`checkpoint_soon` copies them into the file afterwards."""
    cfg = node_config(tmp_path, {"path": "var/ledger.sqlite3"})
    store = ClearingStore.open(cfg).for_verification(cache_kib=4096)
    assert store.db.one("PRAGMA cache_size") == (-4096,)
    assert store.db.one("PRAGMA wal_autocheckpoint") == (0,)
    clearing_file = tmp_path / "var/ledger-clearing.sqlite3"
    empty = clearing_file.stat().st_size
    with store.db.write():  # over the default checkpoint's 1,000 pages
        for i in range(6000):
            store.set_meta(f"n{i}", "x" * 1000)
    assert clearing_file.stat().st_size == empty  # committed, and all in the log
    thread = store.checkpoint_soon()
    assert thread is not None
    thread.join(timeout=30)
    assert clearing_file.stat().st_size > 6000 * 1000
    assert store.meta("n5999") == "x" * 1000
    store.close()


def test_a_checkpoint_between_parts_keeps_the_log_one_part_long(tmp_path: Path):
    """The verifier copies the log into the file after each committed part of a batch, on
    its own connection: the next part starts the log over. Without it the log grows by
    every part (it did through a whole 10 M-line batch)."""
    cfg = node_config(tmp_path, {"path": "var/ledger.sqlite3"})
    store = ClearingStore.open(cfg).for_verification(cache_kib=4096)
    wal = tmp_path / "var/ledger-clearing.sqlite3-wal"

    def part(n: int) -> int:
        with store.db.write():
            for i in range(2000):
                store.set_meta(f"p{n}-{i}", "x" * 1000)
        return wal.stat().st_size

    one = part(1)
    store.checkpoint_now()
    assert part(2) <= one * 1.1  # the log started over
    store.checkpoint_now()
    assert part(3) <= one * 1.1
    without = part(4)  # no checkpoint before it: the log only grows
    assert without > one * 1.5
    assert store.meta("p1-0") == store.meta("p4-1999") == "x" * 1000
    store.close()


def test_on_postgres_the_verifiers_connection_is_left_as_it_is(pg_config: NodeConfig):
    store = ClearingStore.open(pg_config).for_verification()
    assert store.checkpoint_soon() is None
    store.checkpoint_now()  # nothing to do
    store.set_meta("a", "b")
    assert store.meta("a") == "b"
    store.close()


def test_a_reader_sees_what_the_store_committed(config: NodeConfig):
    store = ClearingStore.open(config)
    reader = ClearingStore.reader(config)
    store.set_meta("seen", "yes")
    assert reader.one("SELECT value FROM meta WHERE name = 'seen'") == ("yes",)
    reader.close()
    store.close()


# ---------------------------------------------------------------- meta


def test_meta_round_trips_is_overwritten_and_survives_reopening(config: NodeConfig):
    store = ClearingStore.open(config)
    assert store.meta("fares_published") == ""  # absent: the default
    assert store.meta("fares_published", "never") == "never"
    store.set_meta("fares_published", "v1")
    assert store.meta("fares_published") == "v1"
    store.set_meta("fares_published", "")  # an empty value is a value
    assert store.meta("fares_published", "never") == ""
    store.set_meta("other", "汉字 and 'quotes'")
    assert store.meta("other") == "汉字 and 'quotes'"
    assert store.meta("fares_published") == ""  # names are independent
    store.close()
    again = ClearingStore.open(config)  # the schema is created if missing, never recreated
    assert again.meta("other") == "汉字 and 'quotes'"
    again.close()


# ---------------------------------------------------------------- queries


def test_disputes_and_out_batches_are_listed_per_period(config: NodeConfig):
    store = ClearingStore.open(config)
    with store.db.write():
        for period, trip in (("2026-11-27", "t-1"), ("2026-11-28", "t-2"), ("2026-11-28", "t-0")):
            store.db.execute(
                "INSERT INTO disputes (counterparty, period, operator_id, trip_id, code, state, "
                "updated_at) VALUES ('512021', ?, 'bus-01', ?, 'UNKNOWN_CARD', 'open', 'x')",
                (period, trip),
            )
        store.db.execute(
            "INSERT INTO out_batches (counterparty, period, seq, kind, lo, hi, state, created_at) "
            "VALUES ('512021', '2026-11-28', 1, 'close', 0, 5, 'built', 'x')"
        )
    assert [d["trip_id"] for d in store.disputes(date(2026, 11, 28))] == ["t-0", "t-2"]
    assert len(store.disputes()) == 3
    assert store.disputes(date(2026, 11, 29)) == []
    [batch] = store.out_batches(date(2026, 11, 28))
    assert (batch["counterparty"], batch["seq"], batch["state"]) == ("512021", 1, "built")
    assert store.out_batches(date(2026, 11, 27)) == []
    store.close()


# ---------------------------------------------------------------- b64


@pytest.mark.parametrize("data", [b"", b"\x00", bytes(range(256)), b"\xff" * 65])
def test_b64_round_trips_any_bytes_as_ascii_text(data: bytes):
    text = b64(data)
    assert isinstance(text, str) and text.isascii()
    assert unb64(text) == data


def test_b64_is_standard_base64():
    """Stored signatures are read by other tools too: the RFC 4648 alphabet, padded."""
    assert b64(b"\xfb\xff") == "+/8="
    assert unb64("+/8=") == b"\xfb\xff"


def test_each_database_records_the_versions_of_the_components_it_holds(config: NodeConfig):
    store = ClearingStore.open(config)
    try:
        assert schema_version(store.db, "clearing") == len(MIGRATIONS)
        assert schema_version(store.trips, "ledger") == len(LEDGER_MIGRATIONS)
        if store.db is not store.trips:  # SQLite: two files, each with its own component
            assert schema_version(store.db, "ledger") == 0
            assert schema_version(store.trips, "clearing") == 0
    finally:
        store.close()


def test_migration_6_keeps_the_lines_and_presentments_stored_before_it(config: NodeConfig):
    """A database at clearing migration 5 (first presentments in a table of their own) is
    migrated in place: its lines read back as they were, with no digest of their own, and
    their presentments rows stay; lines stored after it carry their digest."""
    ledger = config.ledger
    open_ledger(ledger.path, ledger.url, ledger.schema).close()
    path = clearing_path(ledger.path) if ledger.path and not ledger.url else None
    before = Db.open(path, ledger.url, ledger.schema)
    assert migrate(before, "clearing", MIGRATIONS[:5]) == 5
    line = ("500111", "bus-01", "t-1", "2026-11-28", 1, 1, "ENTITLEMENT_MISMATCH", 200, 0)
    before.execute(
        "INSERT INTO in_lines (sender, operator_id, trip_id, period, seq, attempt, code, "
        "claimed_fen, accepted_claim_fen) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        line,
    )
    before.execute(
        "INSERT INTO in_line_presentments (sender, operator_id, trip_id, digest, correctable) "
        "VALUES ('500111', 'bus-01', 't-1', 'd1', 'c1')"
    )
    before.close()
    store = ClearingStore.open(config)
    try:
        assert schema_version(store.db, "clearing") == len(MIGRATIONS) >= 6
        cols = "sender, operator_id, trip_id, period, seq, attempt, code, claimed_fen, "
        row = store.db.one(f"SELECT {cols} accepted_claim_fen, digest, correctable FROM in_lines")
        assert row == (*line, None, None)
        kept = store.db.one("SELECT digest, correctable FROM in_line_presentments")
        assert kept == ("d1", "c1")
    finally:
        store.close()
