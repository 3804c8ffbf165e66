"""The ledger in PostgreSQL (broker.settlement.ledger.postgres): schema names, ingest_seq, types.

What both stores share is tested in test_common.py; here: the schema a district's
tables live in, the ``bigserial`` ``ingest_seq``, and rows read back raw.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from datetime import date, timedelta, timezone

import psycopg
import pytest

from broker.core.errors import ConfigError
from broker.settlement.ledger import PostgresLedger, open_ledger
from broker.settlement.ledger.common import TRIP_COLUMNS, trip_from_row
from broker.settlement.trips import ACCEPT, Judgement, Trip
from broker.testbed.build import free_port
from tests.settlement.ledger.test_common import BAD_AMOUNTS, NOW, trip


@pytest.fixture
def schemas(postgres_url: str) -> Iterator[Callable[..., str]]:
    """Fresh schema names (``yk_test_<hex>``, padded to ``length``), each dropped afterwards."""
    made: list[str] = []

    def new(length: int = 0) -> str:
        made.append(f"yk_test_{secrets.token_hex(4)}".ljust(length, "x"))
        return made[-1]

    yield new
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        for name in made:
            conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


def raw(url: str, sql: str, schema: str = "public") -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        conn.execute(f"SET search_path TO {schema}")
        return [tuple(r) for r in conn.execute(sql).fetchall()]


@pytest.mark.parametrize(
    "schema",
    ["", "Yikatong", "1district", "yk-500111", "yk 500111", "yk;drop", "ykö", "a" * 64],
)
def test_a_schema_that_is_not_a_lower_case_identifier_is_refused_before_connecting(schema):
    """The name goes into SQL text: it is checked first (this URL reaches no server)."""
    with pytest.raises(ConfigError, match="lower-case SQL identifier"):
        PostgresLedger(f"postgresql://nobody@127.0.0.1:{free_port()}/none", schema)


def test_a_63_character_schema_name_is_accepted(postgres_url, schemas):
    name = schemas(63)
    ledger = PostgresLedger(postgres_url, name)
    ledger.record([(trip(1), ACCEPT)], NOW)
    ledger.close()
    assert raw(postgres_url, f"SELECT count(*) FROM {name}.trips") == [(1,)]


def test_an_unreachable_database_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot reach the ledger database"):
        PostgresLedger(f"postgresql://nobody@127.0.0.1:{free_port()}/none?connect_timeout=2")


def test_open_ledger_with_a_url_opens_postgres_in_the_schema(postgres_url, schemas):
    name = schemas()
    ledger = open_ledger(None, postgres_url, name)
    assert isinstance(ledger, PostgresLedger)
    ledger.close()
    tables = raw(
        postgres_url,
        f"SELECT table_name FROM information_schema.tables WHERE table_schema = '{name}'",
    )
    assert sorted(tables) == [
        ("schema_migrations",),
        ("sealed_days",),
        ("trip_gates",),
        ("trips",),
    ]


def test_two_schemas_on_one_database_are_two_ledgers(postgres_url, schemas):
    a, b = PostgresLedger(postgres_url, schemas()), PostgresLedger(postgres_url, schemas())
    a.record([(trip(1), ACCEPT)], NOW)
    b.record([(trip(1, place_id="route-9"), BAD_AMOUNTS)], NOW)  # same id, other content
    assert a.outcome("bus-01", "t-000001") == ACCEPT
    assert b.outcome("bus-01", "t-000001") == BAD_AMOUNTS  # no conflict across districts
    assert a.count() == b.count() == 1
    a.close()
    b.close()


def test_ingest_seq_grows_in_commit_order_and_survives_reopen(postgres_url, schemas):
    name = schemas()
    ledger = PostgresLedger(postgres_url, name)
    ledger.record([(trip(n), ACCEPT) for n in (5, 1, 3)], NOW)  # row order, not id order
    ledger.record([(trip(2), BAD_AMOUNTS)], NOW)
    ledger.close()
    reopened = PostgresLedger(postgres_url, name)
    reopened.record([(trip(1), ACCEPT), (trip(4), ACCEPT)], NOW)  # one known, one new
    reopened.close()
    rows = raw(postgres_url, f"SELECT trip_id, ingest_seq FROM {name}.trips ORDER BY ingest_seq")
    assert [t for t, _ in rows] == ["t-000005", "t-000001", "t-000003", "t-000002", "t-000004"]
    seqs = [int(str(s)) for _, s in rows]
    assert seqs == sorted(set(seqs))  # strictly increasing; gaps are allowed


def test_rows_are_typed_and_read_back_through_trip_columns(postgres_url, schemas):
    name = schemas()
    ledger = PostgresLedger(postgres_url, name)
    shanghai = timezone(timedelta(hours=8))
    t = trip(1, occurred_at=NOW.astimezone(shanghai).replace(hour=0, minute=0, microsecond=7))
    ledger.record([(t, ACCEPT)], NOW)
    ledger.close()
    [(day, occurred)] = raw(postgres_url, f"SELECT settlement_day, occurred_at FROM {name}.trips")
    assert day == date(2026, 11, 28)  # the Shanghai day, though it is the 27th in UTC
    assert occurred == t.occurred_at
    [row] = raw(postgres_url, f"SELECT {TRIP_COLUMNS} FROM trips", name)
    back = trip_from_row(row)
    assert back == t
    assert back.occurred_at.utcoffset() == timedelta(0)


def test_trips_are_analyzed_as_they_grow_so_resubmissions_stay_index_lookups(postgres_url, schemas):
    """A ledger that grew from empty is planned by statistics it gathers itself (autovacuum
    may be off, and looks once a minute at best): without them, looking up the stored ids of
    a resubmitted request scanned every trip of its operator (broker.core.planner). Its
    gates' table is analyzed the same way."""
    name = schemas()
    ledger = PostgresLedger(postgres_url, name)

    def batch(start: int) -> list[tuple[Trip, Judgement]]:
        return [(trip(n, gate_id=f"g-{n}"), ACCEPT) for n in range(start, start + 1_000)]

    def planned(table: str) -> float:
        sql = f"SELECT reltuples FROM pg_class WHERE oid = '{name}.{table}'::regclass"
        return float(str(raw(postgres_url, sql)[0][0]))

    try:
        for start in range(0, 9_000, 1_000):
            ledger.record(batch(start), NOW)
        assert planned("trips") <= 0 and planned("trip_gates") <= 0  # 9,000: not yet
        ledger.record(batch(9_000), NOW)
        assert planned("trips") == 10_000 and planned("trip_gates") == 10_000
        assert ledger.record(batch(9_000), NOW) == [ACCEPT] * 1_000  # the stored outcomes
    finally:
        ledger.close()
