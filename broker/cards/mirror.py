"""A copy, in this process's memory, of what a gate reads from a PostgreSQL registry.

A gate's check of one of this district's own cards reads one row. On SQLite
that is a primary-key probe of a local file, microseconds on the event loop;
on PostgreSQL it would be a round trip on every check. So a node whose
registry is on PostgreSQL keeps a copy of the cards (:class:`CardCopy`) in an
in-memory SQLite database — nothing of it on disk — and its gates read that.

- **Loaded** at start in one snapshot of the registry, with the status log's
  position at that snapshot.
- **Kept current from the status log**: every change that alters an answer
  (status, validity, flags, birth date, a new card) appends an event in its
  own transaction (:mod:`broker.cards.status_log`); the copy reads the events
  after its position and re-reads those cards' rows. A log it cannot go on
  from (reset, restored, or past the retention) is loaded again whole, into
  a new copy that replaces the old at once.
- **Lag**: one notification (``NOTIFY``, milliseconds; a poll every
  ``poll_s`` if notifications are lost): a card reported lost is refused by
  this district's own gates as soon as its peers' are.

Peers' ``Recognize`` does not read the copy: its answer carries the log's
position, which must be the one the card was read at (one statement of the
registry itself, :meth:`broker.cards.registry.Registry.lookup_with_position`).
Memory: about 100 bytes a card (a district of a million cards: ~100 MiB).
"""

from __future__ import annotations

import threading
import time

import structlog

from broker.cards import status_log
from broker.cards.config import RegistryConfig
from broker.cards.csv_import import CardRow
from broker.cards.model import LogPosition
from broker.cards.registry import card_from_row, connect
from broker.cards.status_log import Restart
from broker.core.db import Db
from broker.core.quiet import StateLog

log = structlog.get_logger(__name__)

_COLUMNS = "card_number, holder_key, birth_date, status, disabled, student, valid_until"
_TABLE = (
    "CREATE TABLE cards (card_number TEXT PRIMARY KEY, holder_key TEXT NOT NULL, "
    "birth_date TEXT NOT NULL, status TEXT NOT NULL, disabled INTEGER NOT NULL, "
    "student INTEGER NOT NULL, valid_until TEXT NOT NULL) WITHOUT ROWID"
)
_PUT = f"INSERT OR REPLACE INTO cards ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
POLL_S = 0.5
RETRY_S = 1.0
WAKE_S = 0.25
JOIN_S = 5.0
READ_LIMIT = 1000


class CardCopy:
    """The registry's cards as of :attr:`position`; read by any thread, written by one (the
    caller of :meth:`load` and :meth:`follow`, or the thread :meth:`start` starts)."""

    def __init__(self, where: RegistryConfig, poll_s: float = POLL_S) -> None:
        self._where = where
        self._poll_s = poll_s
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._source = connect(where)
        self._copy = Db.memory()
        self._retired: Db | None = None
        self.position: LogPosition | None = None
        self.loads = 0  # whole loads (the first, and one per restart of the log)

    def load(self) -> int:
        """Copy every card, and the log's position, from one snapshot; how many cards."""
        fresh = Db.memory()
        fresh.execute(_TABLE)
        count = 0
        # The position first, then the rows: rows at least as new as the position (a change
        # in between is read again by the next follow, to the same or a newer row).
        position = status_log.head(self._source)
        for block in self._source.stream(f"SELECT {_COLUMNS} FROM cards", size=5000):
            with fresh.write():
                fresh.executemany(_PUT, block)
            count += len(block)
        if self._retired is not None:
            self._retired.close()
        # Readers move to the new copy at once; the old one is closed at the next load, so
        # a read that took it just before the swap still finishes on it.
        self._retired, self._copy = self._copy, fresh
        self.position = position
        self.loads += 1
        return count

    def follow(self) -> int:
        """Apply the changes logged after :attr:`position`; how many events were read."""
        if self.position is None:
            self.load()
            return 0
        got = status_log.read(self._source, self.position, READ_LIMIT)
        if isinstance(got, Restart):
            log.info("card_copy_reloaded", reason=got.reason)
            self.load()
            return 0
        if not got:
            return 0
        # Rows as they are now: at least as new as the events (a later event re-reads them).
        numbers = sorted({e.card_number for e in got})
        rows = []
        for start in range(0, len(numbers), 500):
            part = numbers[start : start + 500]
            marks = ", ".join("?" * len(part))
            rows += self._source.all(
                f"SELECT {_COLUMNS} FROM cards WHERE card_number IN ({marks})", part
            )
        with self._copy.write():
            self._copy.executemany(_PUT, rows)
        self.position = got[-1].cursor
        return len(got)

    def lookup(self, card_number: str) -> CardRow | None:
        """The card as last copied (``None``: not this district's)."""
        row = self._copy.one(f"SELECT {_COLUMNS} FROM cards WHERE card_number = ?", (card_number,))
        return None if row is None else card_from_row(row)

    def start(self) -> None:
        """Keep the copy current on a thread of its own: woken by ``NOTIFY`` on the log's
        channel, and every ``poll_s`` in case a notification is lost."""
        self._thread = threading.Thread(target=self._follow_on, name="card-copy", daemon=True)
        self._thread.start()

    def _follow_on(self) -> None:
        state = StateLog(log, "card_copy_follow")
        while not self._stopping.is_set():
            listener: Db | None = None
            try:
                listener = connect(self._where)
                listener.listen(status_log.channel(listener))
                while not self._stopping.is_set():
                    while self.follow() >= READ_LIMIT:
                        pass  # more were waiting: read on at once
                    state.ok()
                    self._wait(listener)
            except Exception as exc:  # the database away: try again; the copy stays as it is
                state.failed(type(exc).__name__)
                self._stopping.wait(RETRY_S)
            finally:
                if listener is not None:
                    listener.close()

    def _wait(self, listener: Db) -> None:
        """Until a notification, ``poll_s``, or :meth:`close` (looked at every quarter second)."""
        ends = time.monotonic() + self._poll_s
        while not self._stopping.is_set() and (left := ends - time.monotonic()) > 0:
            if listener.wait_notified(min(left, WAKE_S)):
                return

    def close(self) -> None:
        self._stopping.set()
        if self._thread is not None:  # it looks at the flag every WAKE_S
            self._thread.join(JOIN_S)
            if self._thread.is_alive():
                log.warning("card_copy_not_stopped", waited_s=JOIN_S)
                return  # it still uses its connections: they go with it
        self._source.close()
        self._copy.close()
        if self._retired is not None:
            self._retired.close()
