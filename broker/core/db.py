"""Database access in one place: how SQLite files are opened, and one wrapper for both databases.

SQLite files are opened in WAL mode (readers never wait for the writer),
``synchronous=FULL`` (a committed transaction survives a power cut), in
autocommit mode (``BEGIN`` issued by the caller); instants are stored as UTC
text. :class:`Db` is one small connection wrapper over SQLite and PostgreSQL,
for code written once for both: SQL is written with ``?`` placeholders and
portable types (TEXT, BIGINT); for PostgreSQL the placeholders become ``%s``
and the connection's ``search_path`` is the district's schema, so table names
are the same in both. Writes happen in :meth:`Db.write` (``BEGIN IMMEDIATE``
on SQLite, a transaction on PostgreSQL), committed before the caller goes on.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from broker.core.errors import ConfigError

_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def open_db(path: Path, schema: str) -> sqlite3.Connection:
    """Open (creating if needed) a database file and apply ``schema``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA busy_timeout=5000")
    db.executescript(schema)
    return db


def utc_text(at: datetime) -> str:
    """An aware instant as sortable UTC text (microseconds)."""
    if at.tzinfo is None:
        raise ValueError("naive datetime: every instant must be timezone-aware")
    return at.astimezone(UTC).isoformat(timespec="microseconds")


class Db:
    """A connection to the ledger database, safe to share between threads (one at a time)."""

    def __init__(self, conn: Any, dialect: str) -> None:
        self._conn = conn
        self.dialect = dialect
        self._lock = threading.RLock()
        self._depth = 0

    @staticmethod
    def open(path: Path | None, url: str | None, schema: str = "yikatong") -> Db:
        """PostgreSQL when ``url`` is given, else SQLite at ``path``."""
        if url:
            import psycopg

            if not _SCHEMA_RE.fullmatch(schema):
                raise ConfigError("ledger schema must be a lower-case SQL identifier")
            try:
                conn = psycopg.connect(url, autocommit=True)
            except psycopg.OperationalError as exc:
                raise ConfigError(f"cannot reach the ledger database: {exc}") from exc
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            conn.execute(f"SET search_path TO {schema}")
            return Db(conn, "postgres")
        if path is None:
            raise ConfigError("[ledger] needs a path (SQLite) or a url (PostgreSQL)")
        return Db(open_db(path, ""), "sqlite")

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.dialect == "postgres" else sql

    def script(self, ddl: str) -> None:
        """Run ``;``-separated DDL statements (idempotent ``IF NOT EXISTS`` ones)."""
        with self.write():
            for stmt in ddl.split(";"):
                if stmt.strip():
                    self._conn.execute(stmt)

    @contextmanager
    def write(self) -> Iterator[None]:
        """One transaction, committed on leaving; nested calls join the outer one."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self._depth = 1
            try:
                if self.dialect == "sqlite":
                    self._conn.execute("BEGIN IMMEDIATE")
                    try:
                        yield
                        self._conn.execute("COMMIT")
                    except BaseException:
                        self._conn.execute("ROLLBACK")
                        raise
                else:
                    with self._conn.transaction():
                        yield
            finally:
                self._depth = 0

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one statement; the number of rows it changed."""
        with self._lock:
            cur = self._conn.execute(self._sql(sql), tuple(args))
            return int(cur.rowcount)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        with self._lock:
            if self.dialect == "sqlite":
                self._conn.executemany(sql, rows)
            else:
                with self._conn.cursor() as cur:
                    cur.executemany(self._sql(sql), rows)

    def one(self, sql: str, args: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        with self._lock:
            row = self._conn.execute(self._sql(sql), tuple(args)).fetchone()
        return tuple(row) if row is not None else None

    def all(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return [tuple(r) for r in self._conn.execute(self._sql(sql), tuple(args)).fetchall()]

    def stream(
        self, sql: str, args: Sequence[Any] = (), size: int = 2000
    ) -> Iterator[list[tuple[Any, ...]]]:
        """Rows in blocks of ``size``, without holding the whole result in memory.

        PostgreSQL reads through a server-side cursor on a connection of its
        own, so the caller may write on this one meanwhile.
        """
        if self.dialect == "sqlite":
            with self._lock:
                cur = self._conn.execute(sql, tuple(args))
                rows = cur.fetchmany(size)
            while rows:
                yield [tuple(r) for r in rows]
                with self._lock:
                    rows = cur.fetchmany(size)
            return
        import psycopg

        info = self._conn.info
        with psycopg.connect(info.dsn, password=info.password) as reader:
            reader.execute(f"SET search_path TO {self.schema()}")
            with reader.transaction(), reader.cursor(name="yk_stream") as cur:
                cur.itersize = size
                cur.execute(self._sql(sql), tuple(args))
                while block := cur.fetchmany(size):
                    yield [tuple(r) for r in block]

    def schema(self) -> str:
        row = self.one("SELECT current_schema()") if self.dialect == "postgres" else None
        return str(row[0]) if row else "main"

    def lock_trips(self) -> None:
        """Inside :meth:`write`: wait for trip writers in flight, keep new ones out until commit.

        On SQLite ``BEGIN IMMEDIATE`` already did this.
        """
        if self.dialect == "postgres":
            self.execute("LOCK TABLE trips IN EXCLUSIVE MODE")

    def close(self) -> None:
        with self._lock:
            self._conn.close()
