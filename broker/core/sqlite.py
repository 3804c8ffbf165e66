"""How the broker opens its embedded SQLite files, in one place.

WAL (readers never wait for the writer), ``synchronous=FULL`` (a committed
transaction survives a power cut), explicit transactions (autocommit mode,
``BEGIN`` issued by the caller), and UTC text for instants.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path


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
