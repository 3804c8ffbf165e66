"""The clearing tables, in the ledger's database (PostgreSQL) or beside it (SQLite).

On PostgreSQL the tables live in the district's schema next to ``trips``.
On SQLite they live in a file of their own beside the ledger
(``ledger-clearing.sqlite3``), so a long verification never holds the lock
operators' trip writes wait for; ``trips`` is read through a second
connection. Every state change is one committed transaction before anything
is sent that depends on it.

Outbound (this district as the place of travel): ``day_closes`` fixes, per
close of a day, the ledger watermark (``ingest_seq``) the close covers;
``out_batches`` one row per batch sent (state ``built`` → ``acked``);
``out_verdicts`` the lines the home district did not accept as sent;
``out_batch_operators`` each acknowledged batch's lines and claim per operator, as sent;
``disputes`` rejected lines (``open`` → ``represented`` → ``accepted`` |
``final`` → ``resolved``). Inbound (this district as home): ``in_batches``
with the stored acknowledgement (a resent batch gets it again),
``in_lines`` one row per line received, with the digest of each rejected first
presentment's card, place, time and gate (a representment must have the same,
:meth:`broker.settlement.trips.Trip.presentment_digest`) and its correctable
values (only a rejected line may be represented; lines stored before clearing
migration 6 have them in ``in_line_presentments``),
``cap_usage`` one row per concession
counted against a cap, ``published_fares`` the peers' fare rules by version.
``positions`` marks each SETTLED day, and ``position_documents`` keeps both
signed position documents of it (the day's figures from then on).
"""

from __future__ import annotations

import base64
import threading
from datetime import date
from pathlib import Path
from typing import Any

from broker.core.db import Db, Migration, migrate
from broker.settlement.config import SettlementSettings
from broker.settlement.ledger import open_ledger

BASELINE = """
CREATE TABLE IF NOT EXISTS day_closes (
    period TEXT NOT NULL, close_no INTEGER NOT NULL, watermark BIGINT NOT NULL,
    created_at TEXT NOT NULL, PRIMARY KEY (period, close_no));
CREATE TABLE IF NOT EXISTS out_batches (
    counterparty TEXT NOT NULL, period TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL,
    lo BIGINT NOT NULL, hi BIGINT NOT NULL, payload TEXT, state TEXT NOT NULL,
    created_at TEXT NOT NULL, digest TEXT, lines BIGINT, claimed_fen BIGINT,
    ack TEXT, ack_key_id TEXT, ack_signature TEXT, accepted_claim_fen BIGINT, acked_at TEXT,
    PRIMARY KEY (counterparty, period, seq));
CREATE TABLE IF NOT EXISTS out_verdicts (
    counterparty TEXT NOT NULL, period TEXT NOT NULL, seq INTEGER NOT NULL,
    line_no BIGINT NOT NULL, operator_id TEXT NOT NULL, trip_id TEXT NOT NULL,
    code TEXT NOT NULL, claimed_fen BIGINT NOT NULL, accepted_claim_fen BIGINT NOT NULL,
    PRIMARY KEY (counterparty, period, seq, line_no));
CREATE INDEX IF NOT EXISTS out_verdicts_trip ON out_verdicts (operator_id, trip_id);
CREATE TABLE IF NOT EXISTS disputes (
    counterparty TEXT NOT NULL, period TEXT NOT NULL, operator_id TEXT NOT NULL,
    trip_id TEXT NOT NULL, code TEXT NOT NULL, state TEXT NOT NULL, represent_seq INTEGER,
    final_code TEXT, accepted_claim_fen BIGINT, note TEXT, updated_at TEXT NOT NULL,
    PRIMARY KEY (counterparty, operator_id, trip_id));
CREATE TABLE IF NOT EXISTS in_batches (
    sender TEXT NOT NULL, period TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL,
    digest TEXT NOT NULL, lines BIGINT NOT NULL, claimed_fen BIGINT NOT NULL,
    accepted_claim_fen BIGINT NOT NULL, ack TEXT NOT NULL, ack_key_id TEXT NOT NULL,
    ack_signature TEXT NOT NULL, received_at TEXT NOT NULL,
    PRIMARY KEY (sender, period, seq));
CREATE TABLE IF NOT EXISTS in_ack_chunks (
    sender TEXT NOT NULL, period TEXT NOT NULL, seq INTEGER NOT NULL, chunk_no INTEGER NOT NULL,
    data TEXT NOT NULL, PRIMARY KEY (sender, period, seq, chunk_no));
CREATE TABLE IF NOT EXISTS in_lines (
    sender TEXT NOT NULL, operator_id TEXT NOT NULL, trip_id TEXT NOT NULL,
    period TEXT NOT NULL, seq INTEGER NOT NULL, attempt INTEGER NOT NULL, code TEXT NOT NULL,
    claimed_fen BIGINT NOT NULL, accepted_claim_fen BIGINT NOT NULL,
    PRIMARY KEY (sender, operator_id, trip_id));
CREATE TABLE IF NOT EXISTS cap_usage (
    source TEXT PRIMARY KEY, holder_key TEXT NOT NULL, scheme TEXT NOT NULL,
    month TEXT NOT NULL, year TEXT NOT NULL, occurred_at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS cap_usage_holder ON cap_usage (holder_key, scheme, year);
CREATE TABLE IF NOT EXISTS published_fares (
    district TEXT NOT NULL, version TEXT NOT NULL, digest TEXT NOT NULL,
    document TEXT NOT NULL, received_at TEXT NOT NULL, PRIMARY KEY (district, version));
CREATE TABLE IF NOT EXISTS positions (
    counterparty TEXT NOT NULL, period TEXT NOT NULL, receivable_fen BIGINT NOT NULL,
    payable_fen BIGINT NOT NULL, state TEXT NOT NULL, confirmed_at TEXT NOT NULL,
    PRIMARY KEY (counterparty, period));
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)
"""

MIGRATIONS = (
    Migration(1, "baseline: closes, batches, verdicts, disputes, fares, positions", BASELINE),
    Migration(
        2,
        "position documents: both signed views of each SETTLED day",
        "CREATE TABLE IF NOT EXISTS position_documents (counterparty TEXT NOT NULL, "
        "period TEXT NOT NULL, side TEXT NOT NULL, document TEXT NOT NULL, "
        "key_id TEXT NOT NULL, signature TEXT NOT NULL, stored_at TEXT NOT NULL, "
        "PRIMARY KEY (counterparty, period, side))",
    ),
    Migration(
        3,
        "presentments: what made each received line the trip it is, for its representment",
        # A table of its own rather than a column of in_lines: the previous
        # release's rows stay as they were; its lines simply have no digest.
        "CREATE TABLE IF NOT EXISTS in_line_presentments (sender TEXT NOT NULL, "
        "operator_id TEXT NOT NULL, trip_id TEXT NOT NULL, digest TEXT NOT NULL, "
        "correctable TEXT, PRIMARY KEY (sender, operator_id, trip_id))",
    ),
    Migration(
        4,
        "claims as sent per operator: statements show what was acknowledged, not a recount",
        "CREATE TABLE IF NOT EXISTS out_batch_operators (counterparty TEXT NOT NULL, "
        "period TEXT NOT NULL, seq INTEGER NOT NULL, operator_id TEXT NOT NULL, "
        "lines BIGINT NOT NULL, claimed_fen BIGINT NOT NULL, "
        "PRIMARY KEY (counterparty, period, seq, operator_id))",
    ),
    Migration(
        5,
        "batches being verified: a big close is committed in parts, unmade unless acknowledged",
        "CREATE TABLE IF NOT EXISTS in_pending (sender TEXT NOT NULL, period TEXT NOT NULL, "
        "seq INTEGER NOT NULL, started_at TEXT NOT NULL, PRIMARY KEY (sender, period, seq))",
    ),
    Migration(
        6,
        "first presentments in in_lines: one index written per received line, not two",
        # A batch's lines come in trip-time order, so their keys land all over the
        # index; a table of presentments keyed the same way was a second such index
        # (a 10 M-line close: two indexes far past the verifier's page cache). Lines
        # stored before keep their in_line_presentments rows, which are read as before.
        "ALTER TABLE in_lines ADD COLUMN digest TEXT;\n"
        "ALTER TABLE in_lines ADD COLUMN correctable TEXT",
    ),
)


VERIFIER_CACHE_KIB = 65_536  # the verifier's SQLite page cache: bounded, whatever the batch


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def clearing_path(ledger_path: Path) -> Path:
    return ledger_path.with_name(f"{ledger_path.stem}-clearing{ledger_path.suffix}")


class ClearingStore:
    """The clearing tables (``db``) and read access to the ledger's ``trips`` (``trips``)."""

    def __init__(self, db: Db, trips: Db, path: Path | None = None) -> None:
        self.db = db
        self.trips = trips
        self.path = path  # the SQLite file of ``db`` (PostgreSQL: none)
        self._checkpointer: Db | None = None
        self._checkpointing: threading.Thread | None = None
        migrate(db, "clearing", MIGRATIONS)

    @staticmethod
    def open(cfg: SettlementSettings) -> ClearingStore:
        open_ledger(cfg.ledger.path, cfg.ledger.url, cfg.ledger.schema).close()  # trips exists
        if cfg.ledger.url:
            db = Db.open(None, cfg.ledger.url, cfg.ledger.schema)
            return ClearingStore(db, db)
        assert cfg.ledger.path is not None  # open_ledger refused a config with neither
        # A million-line verification holds the clearing file's write lock a while.
        path = clearing_path(cfg.ledger.path)
        db = Db.sqlite(path, busy_timeout_ms=120_000)
        return ClearingStore(db, Db.sqlite(cfg.ledger.path), path)

    def for_verification(self, cache_kib: int = VERIFIER_CACHE_KIB) -> ClearingStore:
        """This store, tuned for the home's verifier: on SQLite, a page cache of ``cache_kib``
        (a batch writes its lines into three indexes in random key order, in one
        transaction: with the default 2 MiB most inserts missed the cache and read the
        page back, through a write-ahead log that grows with the batch)."""
        if self.db.dialect == "sqlite":
            self.db.execute(f"PRAGMA cache_size = -{int(cache_kib)}")
            # A batch's commit is durable without a checkpoint (its log is synced); copying
            # the log into the file waits until the acknowledgement is on its way
            # (:meth:`checkpoint_soon`), not before it.
            self.db.execute("PRAGMA wal_autocheckpoint = 0")
        return self

    def checkpoint_now(self) -> None:
        """Copy the write-ahead log into the SQLite file on ``db``'s own connection, between
        two parts of a batch: the next part's first write then starts the log over, so it
        stays one part long (a checkpoint beside the next part never caught up with it, and
        the log grew through the whole batch). Nothing to do on PostgreSQL."""
        if self.path is not None and self.db.dialect == "sqlite":
            self.db.one("PRAGMA wal_checkpoint(PASSIVE)")

    def checkpoint_soon(self) -> threading.Thread | None:
        """Copy the write-ahead log into the SQLite file, on a thread and a connection of
        their own (the verifier's, once it answered a batch; between its parts,
        :meth:`checkpoint_now`): whatever ``db`` does meanwhile. ``None`` when there is
        nothing to do (PostgreSQL) or a copy is still under way (the next one takes what it
        left)."""
        if self.path is None or self.db.dialect != "sqlite":
            return None
        if self._checkpointing is not None and self._checkpointing.is_alive():
            return None
        if self._checkpointer is None:
            self._checkpointer = Db.sqlite(self.path)
        thread = threading.Thread(
            target=self._checkpointer.one, args=("PRAGMA wal_checkpoint(PASSIVE)",), daemon=True
        )
        thread.start()
        self._checkpointing = thread
        return thread

    @staticmethod
    def reader(cfg: SettlementSettings) -> Db:
        """Another connection to the clearing tables (as :meth:`open` made them)."""
        if cfg.ledger.url:
            return Db.postgres(cfg.ledger.url, cfg.ledger.schema)
        assert cfg.ledger.path is not None
        return Db.sqlite(clearing_path(cfg.ledger.path))

    def close(self) -> None:
        if self._checkpointing is not None:
            self._checkpointing.join()
        if self._checkpointer is not None:
            self._checkpointer.close()
        self.db.close()
        if self.trips is not self.db:
            self.trips.close()

    # ------------------------------------------------------------ meta

    def meta(self, name: str, default: str = "") -> str:
        row = self.db.one("SELECT value FROM meta WHERE name = ?", (name,))
        return str(row[0]) if row else default

    def set_meta(self, name: str, value: str) -> None:
        self.db.execute(
            "INSERT INTO meta (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (name, value),
        )

    # ------------------------------------------------------------ queries shared by reports

    def out_batches(self, period: date) -> list[dict[str, Any]]:
        cols = (
            "counterparty, seq, kind, state, lines, claimed_fen, accepted_claim_fen, digest, "
            "created_at, acked_at"
        )
        rows = self.db.all(
            f"SELECT {cols} FROM out_batches WHERE period = ? ORDER BY counterparty, seq",
            (period.isoformat(),),
        )
        names = [c.strip() for c in cols.split(",")]
        return [dict(zip(names, r, strict=True)) for r in rows]

    def disputes(self, period: date | None = None) -> list[dict[str, Any]]:
        cols = "counterparty, period, operator_id, trip_id, code, state, final_code, note"
        sql = f"SELECT {cols} FROM disputes"
        args: tuple[str, ...] = ()
        if period is not None:
            sql += " WHERE period = ?"
            args = (period.isoformat(),)
        rows = self.db.all(sql + " ORDER BY counterparty, operator_id, trip_id", args)
        names = [c.strip() for c in cols.split(",")]
        return [dict(zip(names, r, strict=True)) for r in rows]


def next_seq(db: Db, counterparty: str, day: str) -> int:
    """The next batch sequence to ``counterparty`` for ``day`` (inside a write)."""
    row = db.one(
        "SELECT coalesce(max(seq), 0) FROM out_batches WHERE counterparty = ? AND period = ?",
        (counterparty, day),
    )
    return (int(row[0]) if row else 0) + 1
