"""Which peer asked about which card, under the peer's own name for it, and until when.

When a peer district asks about one of this district's cards it may give a
*handle*: its own opaque name for the card (its cache key). The home keeps
(peer, card, handle, until) — ``until`` being the end of the time the answer
may be cached — so that a change of the card reaches exactly the peers that
may still hold an answer about it, named so that only that peer can tell
which card it is. One live handle per (peer, card): a newer one replaces it.

A handle is untrusted input: only exactly 32 lowercase hex characters are
kept (:func:`valid_handle`); anything else is not stored, and the answer is
still given, without push. Handles are never logged.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from broker.cards.config import RegistryConfig
from broker.core.db import Db, Migration, migrate, utc_text

# SQLite: a file of their own beside the registry, with its own write lock: keeping a
# handle (a write on every Recognize that gives one) never waits for an import of the
# registry, and an import never waits for them. PostgreSQL: a table in the registry's
# schema (row locks: the two never wait for each other there either).
_TABLE = (
    "CREATE TABLE IF NOT EXISTS peer_handles (peer TEXT NOT NULL, card_number TEXT NOT NULL, "
    "handle TEXT NOT NULL, until TEXT{collate} NOT NULL, PRIMARY KEY (peer, card_number));\n"
    "CREATE INDEX IF NOT EXISTS peer_handles_until ON peer_handles (until)"
)
MIGRATIONS = (
    Migration(
        1,
        "peers' handles: which peer asked about which card, by its own name for it, until when",
        _TABLE.format(collate=""),
        _TABLE.format(collate=' COLLATE "C"'),  # sortable UTC text, compared byte by byte
    ),
)


def handles_path(registry: Path) -> Path:
    """Where the handles of the registry at ``registry`` are kept (SQLite)."""
    return registry.with_name(f"{registry.stem}-handles{registry.suffix}")


def open_handles(where: RegistryConfig | Path) -> Db:
    """A connection to the handles of the registry ``where`` names (the ``[registry]``
    section, or its SQLite file), created and migrated if needed."""
    cfg = where if isinstance(where, RegistryConfig) else RegistryConfig(where)
    # A handle need not survive a power cut: a home that loses power loses its streams
    # with it, and the handles it then lacks only leave peers on the TTL alone, as before
    # pushes. SQLite: NORMAL, not FULL (an fsync per Recognize cost ~0.3 ms here), so a
    # handle survives the process dying (WAL). PostgreSQL: the commit does not wait for
    # the flush (``synchronous_commit``), this connection's only.
    if cfg.url:
        db = Db.postgres(cfg.url, cfg.schema, "registry")
        db.execute("SET synchronous_commit = off")
    else:
        assert cfg.path is not None
        db = Db.sqlite(handles_path(cfg.path))
        db.execute("PRAGMA synchronous=NORMAL")
    migrate(db, "handles", MIGRATIONS)
    return db


PER_STATEMENT = 500  # handles written by one statement (4 parameters each)
_HANDLE = re.compile(r"[0-9a-f]{32}")


def valid_handle(text: str) -> bool:
    """Exactly 32 lowercase hex characters (what a gate's cache key is)."""
    return len(text) == 32 and _HANDLE.fullmatch(text) is not None


@dataclass(frozen=True, slots=True)
class Handle:
    """A peer's name for one of this district's cards, live until ``until``."""

    peer: str
    card_number: str
    handle: str
    until: datetime


def remember(db: Db, handles: Sequence[Handle]) -> None:
    """Keep ``handles`` (valid ones: see :func:`valid_handle`), all or none.

    For the same (peer, card), the later in ``handles`` wins, and a stored
    one is replaced unless it lives longer under the same handle. One
    statement for up to :data:`PER_STATEMENT` of them (one round trip to
    PostgreSQL, atomic by itself); more are written in one transaction.
    """
    latest = {(h.peer, h.card_number): h for h in handles}  # the later wins
    rows = [(h.peer, h.card_number, h.handle, utc_text(h.until)) for h in latest.values()]
    if not rows:
        return
    parts = [rows[i : i + PER_STATEMENT] for i in range(0, len(rows), PER_STATEMENT)]
    if len(parts) == 1:
        _upsert(db, parts[0])
        return
    with db.write():
        for part in parts:
            _upsert(db, part)


def _upsert(db: Db, rows: list[tuple[str, str, str, str]]) -> None:
    values = ", ".join(["(?, ?, ?, ?)"] * len(rows))
    db.execute(
        f"INSERT INTO peer_handles (peer, card_number, handle, until) VALUES {values} "
        "ON CONFLICT (peer, card_number) DO UPDATE SET handle = excluded.handle, "
        "until = CASE WHEN peer_handles.handle = excluded.handle "
        "AND peer_handles.until > excluded.until THEN peer_handles.until "
        "ELSE excluded.until END",
        [v for row in rows for v in row],
    )


def live_handles(
    db: Db, peer: str, card_numbers: Sequence[str], at: datetime
) -> dict[str, tuple[str, datetime]]:
    """``peer``'s handle for each of ``card_numbers`` that is live at ``at``, with its end."""
    out: dict[str, tuple[str, datetime]] = {}
    unique = sorted(set(card_numbers))
    for start in range(0, len(unique), 500):
        part = unique[start : start + 500]
        marks = ", ".join("?" * len(part))
        for card, handle, until in db.all(
            f"SELECT card_number, handle, until FROM peer_handles "
            f"WHERE peer = ? AND card_number IN ({marks}) AND until >= ?",
            (peer, *part, utc_text(at)),
        ):
            out[str(card)] = (str(handle), datetime.fromisoformat(until))
    return out


def purge(db: Db, before: datetime, chunk: int = 5000) -> int:
    """Forget handles that ended before ``before``; how many (deleted in parts)."""
    gone = 0
    while True:
        with db.write():
            n = db.execute(
                "DELETE FROM peer_handles WHERE (peer, card_number) IN (SELECT peer, card_number "
                "FROM peer_handles WHERE until < ? LIMIT ?)",
                (utc_text(before), chunk),
            )
        gone += n
        if n < chunk:
            return gone
