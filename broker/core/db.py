"""Every database connection, in one place: SQLite files and PostgreSQL, one wrapper, migrations.

SQLite files are opened in WAL mode (readers never wait for the writer),
``synchronous=FULL`` (a committed transaction survives a power cut), in
autocommit mode (``BEGIN`` issued by :meth:`Db.write`); instants are stored as
UTC text. :class:`Db` is one small connection wrapper over SQLite and
PostgreSQL, for code written once for both: SQL is written with ``?``
placeholders and portable types (TEXT, BIGINT); for PostgreSQL the
placeholders become ``%s`` and the connection's ``search_path`` is the
district's schema, so table names are the same in both. Writes happen in
:meth:`Db.write` (``BEGIN IMMEDIATE`` on SQLite, a transaction on
PostgreSQL), committed before the caller goes on.

Schemas change only by :func:`migrate`: each component (registry, ledger,
clearing) has an ordered list of :class:`Migration` steps, recorded in the
``schema_migrations`` table as they are applied, each in the transaction that
applies it. Steps are additive — new tables, new nullable columns, new indexes;
never a drop, a rename or a type change — so the previous release can still
open a database a newer one has migrated, and a newer database is opened as it
is (with a warning) rather than refused.

SQLite files hold card numbers, birth dates and disability flags, so they
are private to the node's user whatever the process umask (PIPL Art. 28,
51): before SQLite opens a file, :func:`private_file` creates it 0600 if it
is missing, and takes group and other access away from an existing one and
from its ``-wal``/``-shm``/``-journal`` (SQLite creates those later with the
database file's mode). Missing directories are created 0700. A directory
that already exists is not ours to change: if others may read or write it,
a warning is logged and the file is opened all the same.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import sqlite3
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import structlog

from broker.core.errors import ConfigError
from broker.core.files import PRIVATE_FILE, private_file

log = structlog.get_logger(__name__)

_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# A single-quoted literal (which may hold ``''``), a ``?`` placeholder, or a ``%``.
_TOKENS = re.compile(r"'(?:[^']|'')*'|[?%]")


def _connect_sqlite(path: Path, busy_timeout_ms: int) -> sqlite3.Connection:
    private_file(path)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    return conn


def utc_text(at: datetime) -> str:
    """An aware instant as sortable UTC text (microseconds)."""
    if at.tzinfo is None:
        raise ValueError("naive datetime: every instant must be timezone-aware")
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def postgres_placeholders(sql: str) -> str:
    """``sql`` with each ``?`` placeholder as ``%s`` (and a literal ``%`` doubled)."""

    def swap(m: re.Match[str]) -> str:
        text = m.group(0)
        return "%s" if text == "?" else text.replace("%", "%%")

    return _TOKENS.sub(swap, sql)


class Db:
    """A connection to one database, safe to share between threads (one at a time)."""

    def __init__(self, conn: Any, dialect: str) -> None:
        self._conn = conn
        self.dialect = dialect
        self._lock = threading.RLock()
        self._depth = 0

    @staticmethod
    def open(path: Path | None, url: str | None, schema: str = "yikatong") -> Db:
        """PostgreSQL when ``url`` is given, else SQLite at ``path``."""
        if url:
            return Db.postgres(url, schema)
        if path is None:
            raise ConfigError("[ledger] needs a path (SQLite) or a url (PostgreSQL)")
        return Db.sqlite(path)

    @staticmethod
    def sqlite(path: Path, busy_timeout_ms: int = 5000) -> Db:
        """A SQLite file, private to this user (see :func:`private_file`), created if missing."""
        return Db(_connect_sqlite(path, busy_timeout_ms), "sqlite")

    @staticmethod
    def memory() -> Db:
        """A SQLite database in this process's memory, gone when closed (nothing on disk)."""
        return Db(
            sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None), "sqlite"
        )

    @staticmethod
    def postgres(url: str, schema: str, purpose: str = "ledger") -> Db:
        """A PostgreSQL connection whose tables live in ``schema`` (created if missing);
        ``purpose`` names the database in the error raised when it cannot be reached."""
        import psycopg

        if not _SCHEMA_RE.fullmatch(schema):
            raise ConfigError(f"schema {schema!r} must be a lower-case SQL identifier")
        try:
            conn = psycopg.connect(url, autocommit=True)
        except psycopg.OperationalError as exc:
            raise ConfigError(f"cannot reach the {purpose} database: {exc}") from exc
        try:
            with conn.transaction():  # replicas starting at once create the schema once
                key = zlib.crc32(f"schema/{schema}".encode()) - 2**31
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
                conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            conn.execute(f"SET search_path TO {schema}")
        except BaseException:
            conn.close()
            raise
        return Db(conn, "postgres")

    def _sql(self, sql: str) -> str:
        return postgres_placeholders(sql) if self.dialect == "postgres" else sql

    # ------------------------------------------------------------ values

    def instant(self, at: datetime) -> Any:
        """An aware instant as this database stores it (UTC text; ``timestamptz``)."""
        text = utc_text(at)
        return text if self.dialect == "sqlite" else at.astimezone(UTC)

    def day(self, d: date) -> Any:
        """A calendar day as this database stores it (ISO text; ``date``)."""
        return d.isoformat() if self.dialect == "sqlite" else d

    # ------------------------------------------------------------ statements

    def script(self, ddl: str) -> None:
        """Run ``;``-separated statements in one write transaction."""
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

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads that see one state of the database (a read transaction: on SQLite a
        deferred ``BEGIN``, which takes no write lock; on PostgreSQL REPEATABLE READ)."""
        with self._lock:
            if self._depth:  # inside a write: already one state
                yield
                return
            self._depth = 1
            try:
                if self.dialect == "sqlite":
                    self._conn.execute("BEGIN")
                    try:
                        yield
                    finally:
                        self._conn.execute("COMMIT")
                else:
                    with self._conn.transaction():
                        self._conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                        yield
            finally:
                self._depth = 0

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one statement; the number of rows it changed."""
        with self._lock:
            cur = self._conn.execute(self._sql(sql), tuple(args))
            return int(cur.rowcount)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        """Run one statement per row; the number of rows changed in all."""
        if not rows:
            return 0
        with self._lock:
            if self.dialect == "sqlite":
                return int(self._conn.executemany(sql, rows).rowcount)
            with self._conn.cursor() as cur:
                cur.executemany(self._sql(sql), rows)
                return int(cur.rowcount)

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

        info = self._conn.info  # a second connection of the same database and schema
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

    # ------------------------------------------------------------ notifications (PostgreSQL)

    def notify(self, channel: str) -> None:
        """PostgreSQL: tell this channel's listeners when the current transaction commits
        (notifications of one transaction to one channel arrive as one). SQLite: nothing."""
        if self.dialect == "postgres":
            self.execute("SELECT pg_notify(?, '')", (channel,))

    def listen(self, channel: str) -> None:
        """PostgreSQL: receive this channel's notifications on this connection (keep it for
        that alone: :meth:`wait_notified` holds it while it waits)."""
        if self.dialect != "postgres":
            raise ConfigError("notifications need PostgreSQL")
        from psycopg import sql

        with self._lock:
            self._conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))

    def wait_notified(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a notification on a channel this connection
        listens to; whether one came. A lost connection raises."""
        with self._lock:
            for _ in self._conn.notifies(timeout=timeout, stop_after=1):
                return True
        return False

    def lock_trips(self) -> None:
        """Inside :meth:`write`: wait for trip writers in flight, keep new ones out until commit.

        On SQLite ``BEGIN IMMEDIATE`` already did this.
        """
        if self.dialect == "postgres":
            self.execute("LOCK TABLE trips IN EXCLUSIVE MODE")

    # ------------------------------------------------------------ locks between processes

    def lock_key(self, name: str) -> int:
        """The advisory-lock key of ``name`` in this schema (a signed 32-bit number)."""
        return zlib.crc32(f"{self.schema()}/{name}".encode()) - 2**31

    def lock_for_transaction(self, name: str) -> None:
        """Inside :meth:`write`: hold the lock ``name`` until the transaction ends.

        PostgreSQL: a transaction-scoped advisory lock, shared by every
        connection to this schema (every replica). SQLite: ``BEGIN IMMEDIATE``
        already keeps every other writer out.
        """
        if self.dialect == "postgres":
            self.execute("SELECT pg_advisory_xact_lock(?)", (self.lock_key(name),))

    @contextmanager
    def held(self, name: str, on_wait: Callable[[str], None] = lambda who: None) -> Iterator[None]:
        """Hold the lock ``name`` for the block, across processes (and hosts, on PostgreSQL).

        When another holds it, ``on_wait`` is told who (as far as the database
        knows), then this waits for it. The lock dies with its holder's process.
        PostgreSQL: a session-level advisory lock; while it is held the
        session's ``application_name`` says who holds it (``pg_stat_activity``).
        SQLite: a POSIX lock on a byte of ``<database>-locks``; one process
        should hold one such lock per database at a time (closing the file
        drops all of the process's locks on it). Not inside :meth:`write`.
        """
        key = self.lock_key(name)
        me = f"yikatong {name} (pid {os.getpid()} on {socket.gethostname()})"
        if self.dialect == "sqlite":
            row = self.one("PRAGMA database_list")  # the main database comes first
            db_file = Path(str(row[2]) if row else "")
            path = db_file.with_name(f"{db_file.name}-locks")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
            try:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, key + 2**31)
                except OSError:
                    on_wait(f"another process on this host ({path})")
                    fcntl.lockf(fd, fcntl.LOCK_EX, 1, key + 2**31)
                yield
            finally:
                os.close(fd)  # releases the lock
            return
        got = self.one("SELECT pg_try_advisory_lock(?)", (key,))
        if not (got and got[0]):
            on_wait(self._holder(key))
            self.execute("SELECT pg_advisory_lock(?)", (key,))
        self.execute("SELECT set_config('application_name', ?, false)", (me,))
        try:
            yield
        finally:
            try:
                self.execute("SELECT pg_advisory_unlock(?)", (key,))
                self.execute("SELECT set_config('application_name', '', false)")
            except Exception as exc:  # a lost connection took the lock with it
                log.warning("advisory lock not released", lock=name, error=str(exc))

    def _holder(self, key: int) -> str:
        """Who holds advisory lock ``key`` (PostgreSQL shows a bigint key in two halves)."""
        row = self.one(
            "SELECT a.application_name, a.pid, a.client_addr, a.backend_start FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
            "AND l.granted AND l.objsubid = 1 AND l.classid::bigint = ? AND l.objid::bigint = ? "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF),
        )
        if row is None:
            return "another session (gone meanwhile)"
        app, pid, addr, since = row
        return (
            f"{app or 'another session'} [PostgreSQL pid {pid}, client {addr or 'local socket'}, "
            f"connected {since.isoformat(timespec='seconds') if since else '?'}]"
        )

    def close(self) -> None:
        with self._lock:
            self._conn.close()


# --------------------------------------------------------------------------- migrations

_NOT_ADDITIVE = re.compile(r"\b(DROP|RENAME|TRUNCATE|DELETE)\b|\bALTER\s+COLUMN\b", re.I)

MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    component TEXT NOT NULL,
    version INTEGER NOT NULL,
    name TEXT NOT NULL,
    applied_at TEXT NOT NULL,
    PRIMARY KEY (component, version)
)
"""


@dataclass(frozen=True)
class Migration:
    """One additive step of a component's schema, in each dialect's SQL (``;``-separated).

    ``postgres`` defaults to the SQLite text when the two are the same.
    """

    version: int
    name: str
    sqlite: str
    postgres: str | None = None

    def __post_init__(self) -> None:
        for sql in (self.sqlite, self.postgres or ""):
            if m := _NOT_ADDITIVE.search(sql):
                raise ValueError(
                    f"migration {self.version} ({self.name}) is not additive: {m.group(0)}"
                )

    def statements(self, dialect: str) -> list[str]:
        sql = self.postgres if dialect == "postgres" and self.postgres is not None else self.sqlite
        return [s.strip() for s in sql.split(";") if s.strip()]


def schema_version(db: Db, component: str) -> int:
    """The last migration applied to ``component`` (0 for none)."""
    _ensure_table(db, component)
    row = db.one(
        "SELECT coalesce(max(version), 0) FROM schema_migrations WHERE component = ?",
        (component,),
    )
    return int(row[0]) if row else 0


def migrate(db: Db, component: str, migrations: Sequence[Migration]) -> int:
    """Apply ``component``'s migrations not yet applied, in order; its version after.

    Each step runs in one transaction with its record in ``schema_migrations``:
    a crash leaves the database at the previous step, and the next open goes
    on from there. Replicas opening one PostgreSQL schema at once migrate one
    at a time (a transaction-scoped advisory lock); on SQLite ``BEGIN
    IMMEDIATE`` does the same. A database migrated further by a newer release
    is opened as it is: its extra steps are additive.
    """
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(migrations) + 1)):
        raise ValueError(f"{component}: migrations must be numbered 1, 2, 3, …: {versions}")
    _ensure_table(db, component)
    for step in migrations:
        with db.write():
            _serialise(db, component)
            done = db.one(
                "SELECT 1 FROM schema_migrations WHERE component = ? AND version = ?",
                (component, step.version),
            )
            if done:
                continue
            for stmt in step.statements(db.dialect):
                db.execute(stmt)
            db.execute(
                "INSERT INTO schema_migrations (component, version, name, applied_at) VALUES (?, "
                "?, ?, ?)",
                (component, step.version, step.name, utc_text(datetime.now(UTC))),
            )
            log.info("schema migrated", component=component, version=step.version, step=step.name)
    version = schema_version(db, component)
    if version > len(migrations):
        log.warning(
            "database schema is newer than this release",
            component=component,
            version=version,
            known=len(migrations),
        )
    return version


def _ensure_table(db: Db, component: str) -> None:
    with db.write():
        _serialise(db, component)
        db.execute(MIGRATIONS_TABLE)


def _serialise(db: Db, component: str) -> None:
    """Inside :meth:`Db.write`: one migrating connection per schema at a time."""
    db.lock_for_transaction(component)
