"""The one ledger store over broker.core.db: its migrations, on SQLite and PostgreSQL.

Behaviour shared by both databases is in test_common.py (through ``ledger_factory``);
the databases' own columns in test_sqlite.py and test_postgres.py. Here: the schema
is versioned, and a database that a newer release has added to still works with this one.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broker.core.db import Db, schema_version
from broker.settlement.ledger import Ledger, open_ledger
from broker.settlement.ledger.store import MIGRATIONS
from broker.settlement.trips import ACCEPT
from tests.settlement.ledger.test_common import NOW, trip

Opener = Callable[[], Ledger]


@pytest.fixture(params=["sqlite", "postgres"])
def opened(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Opener, Db]]:
    """How to open the ledger, and a raw connection to the same database."""
    if request.param == "sqlite":
        path = tmp_path / "ledger.sqlite3"
        raw = Db.sqlite(path)
        yield (lambda: open_ledger(path, None)), raw
        raw.close()
        return
    url = request.getfixturevalue("postgres_url")
    schema = f"yk_test_{secrets.token_hex(4)}"
    raw = Db.postgres(url, schema)
    yield (lambda: open_ledger(None, url, schema)), raw
    raw.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    raw.close()


def test_opening_records_the_ledgers_schema_version(opened: tuple[Opener, Db]):
    open_, raw = opened
    open_().close()
    assert schema_version(raw, "ledger") == len(MIGRATIONS)
    names = raw.all("SELECT name FROM schema_migrations WHERE component = 'ledger'")
    assert names == [(m.name,) for m in MIGRATIONS]


def test_a_column_a_newer_release_added_does_not_stop_this_one(opened: tuple[Opener, Db]):
    """Every insert names its columns, so an added nullable column is left NULL, not misfilled."""
    open_, raw = opened
    open_().close()
    raw.execute("ALTER TABLE trips ADD COLUMN added_later TEXT")
    raw.execute(
        "INSERT INTO schema_migrations (component, version, name, applied_at) "
        "VALUES ('ledger', ?, 'a newer release', '2027-01-01T00:00:00+00:00')",
        (len(MIGRATIONS) + 1,),
    )
    ledger = open_()
    try:
        assert ledger.record([(trip(1), ACCEPT), (trip(2), ACCEPT)], NOW) == [ACCEPT, ACCEPT]
        assert ledger.record([(trip(1), ACCEPT)], NOW) == [ACCEPT]  # resubmitted: row by row
        assert ledger.count() == 2
    finally:
        ledger.close()
    assert raw.all("SELECT added_later FROM trips") == [(None,), (None,)]
    assert schema_version(raw, "ledger") == len(MIGRATIONS) + 1  # left as the newer one set it


def test_ingest_seq_still_grows_by_one_per_trip_across_opens(opened: tuple[Opener, Db]):
    open_, raw = opened
    for n in (1, 2):
        ledger = open_()
        ledger.record([(trip(10 * n + i), ACCEPT) for i in range(3)], NOW)
        ledger.close()
    seqs = [int(s) for (s,) in raw.all("SELECT ingest_seq FROM trips ORDER BY ingest_seq")]
    assert seqs == list(range(seqs[0], seqs[0] + 6))
