"""The home's log of card changes: what a peer that asked about a card is to be told.

Every change of a card's status, validity or flags that the registry records
(an import, ``broker registry set-status``) appends one event *in the same
transaction* as the change, so neither exists without the other.

On PostgreSQL (a registry shared by replicas on several hosts) a commit of new
events is announced with ``NOTIFY`` (:func:`announce`), so the feeds of every
replica read on at once; they poll the head too, less often, in case a
notification is lost with a connection.

Order and gaps: an event's sequence number comes from the one counter row of
``status_log``, updated in that transaction. Writers of a registry are
serialised (``BEGIN IMMEDIATE`` on SQLite; on PostgreSQL the counter row's
lock is held until commit), so numbers are assigned in commit order and
without gaps: a subscriber that has seen ``n`` has seen everything up to
``n``.

Which history: the log has an *epoch*, a random id drawn when the log is
created or reset (:func:`reset`), and every event carries a *mark*, 128
random bits of its own (random, not a hash of the event: marks are shown to
peers, and a hash of a card number is guessable). A subscriber's cursor is
(epoch, seq, mark). A registry restored from an older copy keeps its epoch
but not its marks: the event at the cursor's number, if there is one, has
another mark (or there is none yet), and the subscriber is told to start
again (:class:`Restart`) rather than silently missing what the copy lost.
So is a cursor older than the events kept (:func:`purge`).

An event names a card by its number: the log is the home's, beside the
registry that holds the numbers anyway; what crosses to a peer is that
peer's own handle for the card, never the number.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from broker.cards.model import CardStatus, LogPosition
from broker.core.db import Db, Migration, utc_text

_LOG_SQLITE = """
CREATE TABLE IF NOT EXISTS status_log (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    epoch TEXT NOT NULL,
    head INTEGER NOT NULL,
    mark TEXT NOT NULL,
    reset_at TEXT NOT NULL
);
INSERT INTO status_log (id, epoch, head, mark, reset_at)
    SELECT 1, lower(hex(randomblob(16))), 0, '', strftime('%Y-%m-%dT%H:%M:%S+00:00', 'now')
    WHERE NOT EXISTS (SELECT 1 FROM status_log);
CREATE TABLE IF NOT EXISTS status_events (
    seq INTEGER PRIMARY KEY,
    card_number TEXT NOT NULL,
    status INTEGER NOT NULL,
    changed_at TEXT NOT NULL,
    recorded_at TEXT NOT NULL,
    logged_at TEXT NOT NULL,
    mark TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS status_events_logged ON status_events (logged_at)
"""

_LOG_POSTGRES = """
CREATE TABLE IF NOT EXISTS status_log (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    epoch TEXT NOT NULL,
    head BIGINT NOT NULL,
    mark TEXT NOT NULL,
    reset_at TEXT NOT NULL
);
INSERT INTO status_log (id, epoch, head, mark, reset_at)
    SELECT 1, md5(random()::text || clock_timestamp()::text), 0, '',
        to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"+00:00"')
    WHERE NOT EXISTS (SELECT 1 FROM status_log);
CREATE TABLE IF NOT EXISTS status_events (
    seq BIGINT PRIMARY KEY,
    card_number TEXT NOT NULL,
    status INTEGER NOT NULL,
    changed_at TEXT NOT NULL,
    recorded_at TEXT NOT NULL,
    logged_at TEXT NOT NULL,
    mark TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS status_events_logged ON status_events (logged_at)
"""

MIGRATION = Migration(
    3,
    "status log: every card change as an event, numbered in commit order, for peers' caches",
    _LOG_SQLITE,
    _LOG_POSTGRES,
)

REFUSING: Final = frozenset({CardStatus.LOST, CardStatus.SUSPENDED, CardStatus.EXPIRED})


@dataclass(frozen=True, slots=True)
class StatusEvent:
    """One change: the card's wire status after it (for an ACTIVE card, only "ask again")."""

    epoch: str
    seq: int
    card_number: str
    status: CardStatus
    changed_at: datetime
    recorded_at: datetime
    logged_at: datetime
    mark: str

    @property
    def refuses(self) -> bool:
        """A refusal a cache may write at once; otherwise the event only invalidates (it
        carries no entitlements: the next check asks the home again)."""
        return self.status in REFUSING

    @property
    def cursor(self) -> LogPosition:
        return LogPosition(self.epoch, self.seq, self.mark)


class Restart:
    """What :func:`read` answers to a cursor it cannot continue from (another epoch, a
    history that differs, or older than the events kept): drop every cached answer of this
    home, and go on from :attr:`head`."""

    __slots__ = ("head", "reason")

    def __init__(self, head: LogPosition, reason: str) -> None:
        self.head = head
        self.reason = reason

    def __repr__(self) -> str:
        return f"Restart({self.reason!r}, head={self.head})"


def append(
    db: Db,
    card_number: str,
    status: CardStatus,
    changed_at: datetime,
    recorded_at: datetime,
    now: datetime,
) -> int:
    """Log one change; call it inside ``db.write()``, in the transaction that makes the change
    (and :func:`announce` the changes there once they are all logged).

    Its sequence number, which it returns, is the counter's next: the
    counter row is updated first, so a concurrent writer waits here until
    this transaction ends.
    """
    mark = secrets.token_hex(16)
    db.execute("UPDATE status_log SET head = head + 1, mark = ? WHERE id = 1", (mark,))
    row = db.one("SELECT head FROM status_log WHERE id = 1")
    if row is None:
        raise RuntimeError("status_log has no counter row: the registry was not migrated")
    seq = int(row[0])
    db.execute(
        "INSERT INTO status_events (seq, card_number, status, changed_at, recorded_at, "
        "logged_at, mark) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (seq, card_number, int(status), utc_text(changed_at), utc_text(recorded_at),
         utc_text(now), mark),
    )  # fmt: skip
    return seq


def channel(db: Db) -> str:
    """The PostgreSQL channel on which commits of new events are announced (one per schema:
    the registries of several districts may share a database)."""
    return f"yk_status_{db.lock_key('status_log') & 0xFFFFFFFF:08x}"


def announce(db: Db) -> None:
    """After :func:`append` or a reset, in the same transaction: on PostgreSQL, wake the
    feeds of every replica when it commits (``NOTIFY``; they poll too, in case one is
    lost). SQLite: nothing (feeds poll a local file)."""
    db.notify(channel(db))


def head(db: Db) -> LogPosition:
    """Where the log ends now: a new subscriber starts here."""
    row = db.one("SELECT epoch, head, mark FROM status_log WHERE id = 1")
    if row is None:
        raise RuntimeError("status_log has no counter row: the registry was not migrated")
    return LogPosition(str(row[0]), int(row[1]), str(row[2]))


def read(db: Db, after: LogPosition | None, limit: int = 1000) -> list[StatusEvent] | Restart:
    """The events after ``after``, oldest first, at most ``limit``; or :class:`Restart`.

    ``None`` (a subscriber that has no cursor) is always told to restart. Read in
    one snapshot: a purge or a reset meanwhile cannot open a gap in what it returns.
    """
    with db.snapshot():
        return _read(db, after, limit)


def _read(db: Db, after: LogPosition | None, limit: int) -> list[StatusEvent] | Restart:
    now = head(db)
    if after is None:
        return Restart(now, "no cursor")
    if after.epoch != now.epoch:
        return Restart(now, "another epoch: the log was reset")
    if after.seq > now.seq:
        return Restart(now, "the cursor is past the end: the registry was restored")
    at = db.one("SELECT mark FROM status_events WHERE seq = ?", (after.seq,))
    if at is not None and str(at[0]) != after.mark:
        return Restart(now, "another history: the registry was restored")
    # The cursor's own event may have gone with the retention while everything after it is
    # kept (a peer that had seen all, then a change, then a purge): it goes on. What it
    # must not do is skip one, so the next event must still be there.
    if (
        after.seq < now.seq
        and db.one("SELECT 1 FROM status_events WHERE seq = ?", (after.seq + 1,)) is None
    ):
        return Restart(now, "older than the events kept")
    rows = db.all(
        "SELECT seq, card_number, status, changed_at, recorded_at, logged_at, mark "
        "FROM status_events WHERE seq > ? ORDER BY seq LIMIT ?",
        (after.seq, limit),
    )
    return [
        StatusEvent(
            now.epoch,
            int(r[0]),
            str(r[1]),
            CardStatus(int(r[2])),
            datetime.fromisoformat(r[3]),
            datetime.fromisoformat(r[4]),
            datetime.fromisoformat(r[5]),
            str(r[6]),
        )
        for r in rows
    ]


def purge(db: Db, before: datetime, chunk: int = 5000) -> int:
    """Drop the events logged before ``before`` (the retention), but never the last one;
    how many went. Numbering goes on; a cursor older than what is kept restarts, and one at
    the head (a peer that has seen everything, however long ago) stays good."""
    gone = 0
    while True:  # in parts: a writer waits for one part at most, never for all of them
        with db.write():
            n = db.execute(
                "DELETE FROM status_events WHERE seq IN (SELECT seq FROM status_events "
                "WHERE logged_at < ? AND seq < (SELECT head FROM status_log WHERE id = 1) "
                "ORDER BY seq LIMIT ?)",
                (utc_text(before), chunk),
            )
        gone += n
        if n < chunk:
            return gone


def reset(db: Db, epoch: str, now: datetime) -> LogPosition:
    """Start a new history under ``epoch`` (e.g. ``secrets.token_hex(16)``): every event is
    dropped and numbering starts again; every subscriber restarts (and flushes)."""
    with db.write():
        db.execute("DELETE FROM status_events")
        db.execute(
            "UPDATE status_log SET epoch = ?, head = 0, mark = '', reset_at = ? WHERE id = 1",
            (epoch, utc_text(now)),
        )
        announce(db)
    return head(db)
