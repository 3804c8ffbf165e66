"""The ledger on SQLite (broker.settlement.ledger.store), read back raw where it matters.

What both stores share is tested in test_common.py; here: the file's own columns
(UTC text, the Shanghai settlement day, ``ingest_seq``) and how a batch fails.
"""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from broker.core.db import utc_text
from broker.core.errors import ConfigError
from broker.settlement.ledger import SqliteLedger, open_ledger
from broker.settlement.ledger.common import TRIP_COLUMNS, trip_from_row
from broker.settlement.trips import ACCEPT
from tests.settlement.ledger.test_common import BAD_AMOUNTS, NOW, trip


def raw(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(sql).fetchall()


def seqs(path: Path) -> list[tuple[str, int]]:
    """``(trip_id, ingest_seq)`` in ingest order."""
    return [(str(t), int(s)) for t, s in raw(path, "SELECT trip_id, ingest_seq FROM trips")]


def test_a_trip_at_23_59_59_999_and_one_at_midnight_shanghai_land_on_different_days(tmp_path):
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")  # the day column, read back raw
    late = datetime(2026, 11, 27, 15, 59, 59, 999000, tzinfo=UTC)  # 23:59:59.999 in Shanghai
    early = datetime(2026, 11, 27, 16, 0, 0, tzinfo=UTC)  # 00:00:00 on the 28th
    trips = [trip(1, occurred_at=late), trip(2, occurred_at=early)]
    ledger.record([(t, ACCEPT) for t in trips], NOW)
    ledger.close()
    days = raw(tmp_path / "ledger.sqlite3", "SELECT settlement_day FROM trips ORDER BY trip_id")
    assert [d for (d,) in days] == ["2026-11-27", "2026-11-28"]


def test_instants_are_stored_as_utc_text_and_rows_read_back_through_trip_columns(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    ledger = SqliteLedger(path)
    shanghai = timezone(timedelta(hours=8))
    t = trip(1, occurred_at=datetime(2026, 11, 28, 15, 55, 0, 1, tzinfo=shanghai))
    ledger.record([(t, ACCEPT)], datetime(2026, 11, 28, 16, 0, tzinfo=shanghai))
    ledger.close()
    [(occurred, received)] = raw(path, "SELECT occurred_at, received_at FROM trips")
    assert occurred == "2026-11-28T07:55:00.000001+00:00"
    assert received == "2026-11-28T08:00:00.000000+00:00"
    [row] = raw(path, f"SELECT {TRIP_COLUMNS} FROM trips")
    back = trip_from_row(row)
    assert back == t  # every field, the instant compared across zones
    assert back.occurred_at.utcoffset() == timedelta(0)


def test_instants_in_utc_already_are_stored_as_utc_text_too(tmp_path):
    """The instant of a trip in UTC (every trip from the wire) skips a conversion: the text
    is utc_text's, with the microseconds even when there are none."""
    path = tmp_path / "ledger.sqlite3"
    ledger = SqliteLedger(path)
    whole = datetime(2026, 11, 28, 7, 55, tzinfo=UTC)
    trips = [trip(1, occurred_at=whole), trip(2, occurred_at=whole.replace(microsecond=7))]
    ledger.record([(t, ACCEPT) for t in trips], NOW)
    ledger.close()
    stored = raw(path, "SELECT occurred_at FROM trips ORDER BY trip_id")
    assert [o for (o,) in stored] == [utc_text(t.occurred_at) for t in trips]
    assert stored[0] == ("2026-11-28T07:55:00.000000+00:00",)


def test_ingest_seq_grows_in_commit_order_and_survives_reopen(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    ledger = SqliteLedger(path)
    ledger.record([(trip(n), ACCEPT) for n in (5, 1, 3)], NOW)  # row order, not id order
    ledger.record([(trip(2), BAD_AMOUNTS)], NOW)
    ledger.close()
    reopened = SqliteLedger(path)
    reopened.record([(trip(4), ACCEPT)], NOW)
    reopened.close()
    got = seqs(path)
    assert [t for t, _ in sorted(got, key=lambda r: r[1])] == [
        "t-000005",
        "t-000001",
        "t-000003",
        "t-000002",
        "t-000004",
    ]
    assert [s for _, s in sorted(got, key=lambda r: r[1])] == [1, 2, 3, 4, 5]


def test_a_resubmission_takes_no_new_ingest_seq_and_new_trips_still_come_after(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    ledger = SqliteLedger(path)
    ledger.record([(trip(1), ACCEPT), (trip(2), ACCEPT)], NOW)
    before = dict(seqs(path))
    ledger.record([(trip(1), ACCEPT), (trip(3), ACCEPT), (trip(2), ACCEPT)], NOW)  # mixed
    after = dict(seqs(path))
    ledger.close()
    assert {k: after[k] for k in before} == before  # the stored ones kept their place
    assert after["t-000003"] > max(before.values())


def test_two_connections_writing_at_once_get_whole_ranges_of_ingest_seq(tmp_path):
    """BEGIN IMMEDIATE serialises writers: each batch is one contiguous run, no seq twice."""
    path = tmp_path / "ledger.sqlite3"
    ledgers = [SqliteLedger(path), SqliteLedger(path)]
    errors: list[BaseException] = []

    def write(w: int) -> None:
        try:
            for b in range(10):
                batch = [trip(1000 * w + 10 * b + i) for i in range(5)]
                ledgers[w].record([(t, ACCEPT) for t in batch], NOW)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    for ledger in ledgers:
        ledger.close()
    assert errors == []
    got = seqs(path)
    assert sorted(s for _, s in got) == list(range(1, 101))
    by_batch: dict[int, list[int]] = {}
    for trip_id, s in got:
        by_batch.setdefault(int(trip_id[2:]) // 10, []).append(s)
    for run in by_batch.values():
        assert sorted(run) == list(range(min(run), min(run) + 5))  # contiguous, not interleaved


def test_a_naive_received_at_is_refused_and_nothing_is_stored(tmp_path):
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    with pytest.raises(ValueError, match="naive"):
        ledger.record([(trip(1), ACCEPT)], NOW.replace(tzinfo=None))
    assert ledger.count() == 0
    ledger.close()


def test_one_naive_trip_refuses_its_batch_whole_and_the_ledger_stays_usable(tmp_path):
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    naive = trip(2, occurred_at=NOW.replace(tzinfo=None))
    with pytest.raises(ValueError, match="naive"):
        ledger.record([(trip(1), ACCEPT), (naive, ACCEPT)], NOW)
    assert ledger.count() == 0 and ledger.outcome("bus-01", "t-000001") is None
    assert ledger.record([(trip(1), ACCEPT)], NOW) == [ACCEPT]  # rolled back, not left open
    assert ledger.count() == 1
    ledger.close()


def test_open_ledger_without_a_url_opens_sqlite_at_the_path(tmp_path):
    path = tmp_path / "var" / "ledger.sqlite3"  # the directory is created
    ledger = open_ledger(path, None)
    assert isinstance(ledger, SqliteLedger)
    ledger.record([(trip(1), ACCEPT)], NOW)
    ledger.close()
    assert raw(path, "SELECT count(*) FROM trips") == [(1,)]


def test_open_ledger_with_neither_path_nor_url_is_a_config_error():
    with pytest.raises(ConfigError, match=r"path .* or a url"):
        open_ledger(None, None)
    with pytest.raises(ConfigError):
        open_ledger(None, "")  # an empty url is no url
