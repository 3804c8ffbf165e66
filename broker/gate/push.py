"""The home's side of pushed status changes: handles kept as peers ask, changes fed to them.

Why a peer never keeps an answer that a change has overtaken: a peer's
handle is committed (:class:`HandleBook`) *before* the home reads its log's
position together with the card for the answer (one statement:
:meth:`broker.cards.registry.Registry.lookup_with_position`). So a change
either committed before that read — the answer already shows it, and its position is at or
past the change — or committed after the handle, and then the feed finds
the handle and sends the change. The peer's cache compares positions, so
the change wins over the answer whichever arrives first.

:class:`StatusFeed` follows the log (:mod:`broker.cards.status_log`) for every
``WatchStatus`` stream of this node. It looks at the log's head every
``poll_s`` (the log is written by other processes: ``broker registry
set-status``, an import, and on PostgreSQL by other hosts; there ``NOTIFY``
wakes it as a change commits, and the poll is the fallback) and wakes the
streams waiting for a change; each
stream reads on from its own cursor and sends its peer only the changes of
cards it holds a live handle for, and a progress position otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import structlog

from broker.cards import handles as handle_store
from broker.cards import status_log
from broker.cards.config import RegistryConfig
from broker.cards.handles import Handle
from broker.cards.model import LogPosition
from broker.cards.registry import connect
from broker.cards.status_log import Restart
from broker.cards.updates import Change, Progress, Rewind, Update
from broker.core.db import Db
from broker.core.quiet import StateLog

log = structlog.get_logger(__name__)

POLL_S = 0.05
PG_POLL_S = 0.5  # PostgreSQL: NOTIFY wakes the feed; this is the fallback
LISTEN_WAIT_S = 0.25  # how often the listener looks whether the feed is closing
LISTEN_RETRY_S = 1.0
JOIN_S = 5.0  # a listener still waiting on its database after this is left to end alone
READ_LIMIT = 1000
EVENT_RETENTION = timedelta(hours=72)
HOUSEKEEPING_S = 60.0
T = TypeVar("T")


class HandleBook:
    """Keeps peers' handles, committing those given in one turn of the event loop together,
    on a thread and a connection of its own (a commit never holds up the registry reads
    that answer gates)."""

    def __init__(self, where: RegistryConfig | Path) -> None:
        self._db = handle_store.open_handles(where)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="handles")
        self._pending: list[tuple[Handle, asyncio.Future[None]]] = []
        self.refused = 0  # handles given that were not kept (malformed)

    async def remember(self, handle: Handle) -> None:
        """Return once ``handle`` is committed (a failure to commit is raised)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((handle, done))
        await done

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(
            self._writer, handle_store.remember, self._db, [h for h, _ in batch]
        )

        def settle(result: asyncio.Future[None]) -> None:
            exc = None if result.cancelled() else result.exception()
            for _, waiter in batch:
                if waiter.done():
                    continue
                if exc is not None:
                    waiter.set_exception(exc)
                else:
                    waiter.set_result(None)

        work.add_done_callback(settle)

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._db.close()


class StatusFeed:
    """The log's changes, per peer, for the ``WatchStatus`` streams of one node."""

    def __init__(
        self,
        where: RegistryConfig | Path,
        clock: Callable[[], datetime],
        poll_s: float | None = None,
        retention: timedelta = EVENT_RETENTION,
    ) -> None:
        """``where``: the ``[registry]`` section (or its SQLite file). ``poll_s``: how often
        the head is read (default: :data:`POLL_S` on SQLite; :data:`PG_POLL_S` on
        PostgreSQL, where ``NOTIFY`` wakes the feed as a change commits). ``retention``:
        how long changes are kept for peers that were away (and handles past their end are
        dropped), tidied every minute or so by the poller.

        Connections of its own, each used by one thread: the streams' reads (the log,
        then the handles), the head (SQLite: on the event loop, one row of a WAL file,
        which a writer never blocks; PostgreSQL: on a thread, a round trip), the tidying
        (its own thread, in parts) and, on PostgreSQL, the listener.
        """
        self._where = where if isinstance(where, RegistryConfig) else RegistryConfig(where)
        self._remote = self._where.on_postgres
        self._db = connect(self._where)
        self._handles = handle_store.open_handles(self._where)
        self._head_db = connect(self._where)
        self._house_db = connect(self._where)
        self._house_handles = handle_store.open_handles(self._where)
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="status-feed")
        self._house = ThreadPoolExecutor(max_workers=1, thread_name_prefix="status-tidy")
        self._header = ThreadPoolExecutor(max_workers=1, thread_name_prefix="status-head")
        self._polls = 0
        self._clock = clock
        self._poll_s = poll_s if poll_s is not None else (PG_POLL_S if self._remote else POLL_S)
        self._retention = retention
        self._now: LogPosition | None = None  # the head as last polled
        self._changed = asyncio.Condition()
        self._poller: asyncio.Task[None] | None = None
        self._woken = asyncio.Event()  # set by the listener: a change was announced
        self._stopping = threading.Event()
        self._listener: threading.Thread | None = None
        self.notified = 0  # notifications received (PostgreSQL)

    async def head(self) -> LogPosition:
        """Where the log stands now (SQLite: read on the event loop, one row never behind a
        lock; PostgreSQL: on a thread of its own)."""
        if self._remote:
            return await asyncio.get_running_loop().run_in_executor(
                self._header, status_log.head, self._head_db
            )
        return status_log.head(self._head_db)

    async def updates(
        self, peer: str, after: LogPosition | None, lifetime_s: float | None = None
    ) -> AsyncGenerator[Update, None]:
        """What ``peer`` is to be told from ``after`` on: without end, or until ``lifetime_s``
        have passed and nothing is to be sent (the peer resumes from its cursor)."""
        self._start()
        loop = asyncio.get_running_loop()
        ends = None if lifetime_s is None else loop.time() + lifetime_s
        cursor = after
        greeted = False
        while ends is None or loop.time() < ends:
            got = await self._run(self._next, peer, cursor)
            if isinstance(got, Rewind):
                yield got
                cursor, greeted = got.position, True
                continue
            if got:
                for update in got:
                    yield update
                cursor, greeted = got[-1].position, True
                continue
            assert cursor is not None
            if not greeted:  # the cursor is good and current: say so, so the peer knows
                yield Progress(cursor)
                greeted = True
            left = None if ends is None else max(ends - loop.time(), 0.0)
            try:
                async with asyncio.timeout(left):  # not wait_for: see _pause
                    await self._wait_past(cursor)
            except TimeoutError:
                return

    def _next(self, peer: str, cursor: LogPosition | None) -> list[Update] | Rewind:
        """On the reader thread: the next updates after ``cursor`` (empty: none yet)."""
        got = status_log.read(self._db, cursor, READ_LIMIT)
        if isinstance(got, Restart):
            return Rewind(got.head, got.reason)
        if not got:
            return []
        earliest = min(e.logged_at for e in got)
        # After the events: a handle committed before a change's event is seen here.
        cards = [e.card_number for e in got]
        live = handle_store.live_handles(self._handles, peer, cards, earliest)
        out: list[Update] = []
        for event in got:
            held = live.get(event.card_number)
            if held is not None and held[1] >= event.logged_at:
                out.append(Change(event.cursor, held[0], event.status))
        if not out or out[-1].position != got[-1].cursor:
            out.append(Progress(got[-1].cursor))
        return out

    async def _wait_past(self, cursor: LogPosition) -> None:
        """Until a poll made after this call finds the head elsewhere than ``cursor``
        (further on, or another history). A head polled before the stream read on past
        it would look "elsewhere" at once: waiting for a later poll keeps that from
        spinning."""
        since = self._polls
        async with self._changed:
            await self._changed.wait_for(
                lambda: self._polls > since and self._now is not None and self._now != cursor
            )

    def _start(self) -> None:
        if self._poller is None:
            self._poller = asyncio.ensure_future(self._poll())
            if self._remote:
                loop = asyncio.get_running_loop()
                self._listener = threading.Thread(
                    target=self._listen, args=(loop,), name="status-listen", daemon=True
                )
                self._listener.start()

    def _listen(self, loop: asyncio.AbstractEventLoop) -> None:
        """On its own thread (PostgreSQL): wake the poller whenever a change is announced;
        after any failure, connect again (the poller reads the head meanwhile anyway)."""
        state = StateLog(log, "status_feed_listen")
        while not self._stopping.is_set():
            db: Db | None = None
            try:
                db = connect(self._where)
                db.listen(status_log.channel(db))
                state.ok()
                self._wake(loop)  # what committed before the LISTEN: read it now
                while not self._stopping.is_set():
                    if db.wait_notified(LISTEN_WAIT_S):
                        self.notified += 1
                        self._wake(loop)
            except Exception as exc:  # the database away: poll alone until it is back
                state.failed(type(exc).__name__)
                self._stopping.wait(LISTEN_RETRY_S)
            finally:
                if db is not None:
                    with contextlib.suppress(Exception):  # already gone with the connection
                        db.close()

    def poke(self) -> None:
        """Read the head now, not at the next poll (on the event loop)."""
        self._woken.set()

    def _wake(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            loop.call_soon_threadsafe(self.poke)
        except RuntimeError:  # the loop closed: the feed is closing
            self._stopping.set()

    async def _pause(self) -> None:
        """Until the next poll: ``poll_s``, or sooner when a change is announced."""
        # asyncio.timeout, not wait_for: on 3.11 wait_for may swallow a cancellation that
        # comes as the event is set (a notification), and close() would wait forever.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._poll_s):
                await self._woken.wait()
        self._woken.clear()

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        tidied = 0.0
        tidy: asyncio.Future[None] | None = None
        state = StateLog(log, "status_feed_poll")
        while True:
            try:
                head = await self.head()
                async with self._changed:
                    self._now = head
                    self._polls += 1
                    self._changed.notify_all()
                if loop.time() - tidied > HOUSEKEEPING_S and (tidy is None or tidy.done()):
                    tidied = loop.time()
                    tidy = loop.run_in_executor(self._house, self._tidy)
                    tidy.add_done_callback(_tidied)
                state.ok()
            except Exception as exc:  # the registry busy or gone for a moment: poll again
                state.failed(type(exc).__name__)
            await self._pause()

    def _tidy(self) -> None:
        now = self._clock()
        status_log.purge(self._house_db, now - self._retention)
        handle_store.purge(self._house_handles, now)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._reader, fn, *args)

    async def close(self) -> None:
        self._stopping.set()
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        if self._listener is not None:  # it looks at the flag every LISTEN_WAIT_S
            await asyncio.to_thread(self._listener.join, JOIN_S)
            if self._listener.is_alive():
                log.warning("status_feed_listener_not_stopped", waited_s=JOIN_S)
        self._reader.shutdown(wait=True)
        self._house.shutdown(wait=True)
        self._header.shutdown(wait=True)
        for db in (self._db, self._handles, self._head_db, self._house_db, self._house_handles):
            db.close()


def _tidied(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and (exc := done.exception()) is not None:
        log.warning("status_log_tidy_failed", error=type(exc).__name__)
