"""PostgreSQL's planner statistics of a growing table, kept current by the process that grows it.

PostgreSQL plans a query by the statistics ``ANALYZE`` gathers. A table
that grew from empty and was never analyzed (autovacuum off, or not yet
around to it: it looks once a minute, and a close writes a million lines
within that) is planned as if tiny: a lookup of 500 trip ids of one
operator becomes a scan of every row of that operator, filtered. Measured
on PostgreSQL 15 with 120,000 rows: 18 ms a lookup, growing with the table
(a verification or a resubmission slowed as it went: quadratic in the
end), against 2 ms once analyzed, which is an index probe per id.

So the writers of the tables that grow by a day's volume (the ledger's
``trips``, the home's ``in_lines``) call :meth:`Statistics.grew` after
writing. The table is analyzed when the rows written since its last
analysis reach the rows it then held (and at least :data:`MIN_ROWS`): a
handful of analyses over a table's life, each a bounded sample (about
30,000 rows by default; 3-6 ms here at 100,000 rows). An analysis inside the caller's
transaction sees the rows it wrote, and plans the rest of that transaction
by them. On SQLite nothing is done: it probes an index for each id of such
a lookup without statistics.
"""

from __future__ import annotations

import re

import structlog

from broker.core.db import Db

log = structlog.get_logger(__name__)

MIN_ROWS = 10_000  # rows written before a table is analyzed at all
_TABLE = re.compile(r"[a-z_][a-z0-9_]*")


class Statistics:
    """When to analyze one table of one PostgreSQL connection (not thread-safe: one writer)."""

    def __init__(self, db: Db, table: str, min_rows: int = MIN_ROWS) -> None:
        if not _TABLE.fullmatch(table):
            raise ValueError(f"table {table!r} must be a lower-case SQL identifier")
        self._db = db
        self._table = table
        self._min_rows = min_rows
        self._held = 0  # rows the table held when it was last analyzed (as the planner knows)
        self._since = 0  # rows written since
        self.analyses = 0
        if db.dialect == "postgres":
            self._held = self._known_rows()

    def _known_rows(self) -> int:
        """The rows the planner's statistics count (``reltuples``; -1, never analyzed: 0)."""
        row = self._db.one(
            "SELECT reltuples FROM pg_class WHERE oid = to_regclass(?)", (self._table,)
        )
        return max(int(row[0]), 0) if row and row[0] is not None else 0

    def grew(self, rows: int) -> bool:
        """``rows`` were written to the table; whether it was analyzed now."""
        if self._db.dialect != "postgres" or rows <= 0:
            return False
        self._since += rows
        if self._since < max(self._min_rows, self._held):
            return False
        self._db.execute(f"ANALYZE {self._table}")
        self.analyses += 1
        self._since = 0
        self._held = self._known_rows()
        log.debug("table_analyzed", table=self._table, rows=self._held)
        return True
