"""Trip intake in a process of its own, so that uploads never hold the node's interpreter lock.

Decoding, validating, judging and recording 10,000 trips is tens of ms of Python
work per request; on threads of the node's process it would hold the
interpreter lock against the event loop that answers gates. So the node hands
each ``SubmitTrips`` request over as its raw bytes, with the caller's operator
id and the node clock's ``now``, to one worker process (spawned at the first
request, niced), which has its own ledger connection, fare schedule and known
districts (a :class:`TripDesk`), and gets the raw bytes of the answer back,
sent only once the trips are committed.

Back-pressure: the bytes and the requests handed over and not yet answered are
bounded (:data:`MAX_QUEUED_BYTES`, :data:`MAX_QUEUED_REQUESTS`); beyond either,
a request is refused at once as busy, with a retry hint, rather than queued
without end while gates wait on the same node. A worker that dies (killed,
crashed) fails the calls it held ``UNAVAILABLE``: what it had committed is
kept and answered again on resubmission (its stored outcome), what it had not
is not there; the next request starts a new worker.

The node keeps a ledger connection of its own only for the health check's
trivial query (:meth:`TripIntake.reachable`): it must neither start a worker
nor wait behind uploads.

The intake port: even handed over as bytes, a 10,000-trip request costs the
node's process CPU to receive (about 4-12 ms beyond its idle background,
measured per thread: TLS and HTTP/2 in gRPC's threads, and two steps of its
event loop, 1-9 ms each, taking the message in and the answer out), every gate
check waiting behind the loop's steps. Given an intake address (the node's
``intake_listen``), the worker also serves ``SubmitTrips`` and
``GetTripOutcomes`` on a port of its own (:meth:`TripIntake.listen`, with a
:class:`Listener` the node gives it: the serving, with the node's trust and
guard, is the node layer's), so that operators' uploads never enter the gate's
process. Both ways in reach the
same desk, one request at a time (the worker's desk thread), each bounded.
The worker runs in the background of the machine (:mod:`broker.core.priority`:
``SCHED_IDLE``), so its TLS and judging yield the core to a gate's thread at once.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import structlog

from broker.core.errors import Busy, InvalidArgument, Unavailable
from broker.core.logs import configure_from_env
from broker.core.priority import to_background
from broker.fares.rules import CHANGEOVER_GRACE, FareSchedule
from broker.settlement.desk import MAX_TRIPS_PER_REQUEST, TripDesk
from broker.settlement.ledger import Ledger, open_ledger
from broker.settlement.trips import DEFAULT_DUPLICATE_WINDOW, DEFAULT_LATE_WINDOW

log = structlog.get_logger(__name__)

# A serialized trip is 70-100 bytes (tests/settlement/test_intake.py measures one): four
# full requests waiting, about as many trips as the thread-based intake queued (40,000).
MAX_QUEUED_BYTES = 4 * MAX_TRIPS_PER_REQUEST * 100
MAX_QUEUED_REQUESTS = 64  # many small requests: each costs a round trip to the worker
RETRY_AFTER_S = 1.0

NICE = 10  # where SCHED_IDLE is missing (broker.core.priority): the gates come first

__all__ = ["MAX_TRIPS_PER_REQUEST", "IntakeSpec", "Listener", "TripIntake", "Trips"]


class Trips(Protocol):
    """What a Settlement servicer needs of intake: the node's :class:`TripIntake`, or in the
    worker the intake port's :class:`DeskCounter`."""

    def submit(self, body: bytes, operator_id: str) -> Awaitable[bytes]: ...
    def outcomes(self, operator_id: str, trip_ids: Sequence[str]) -> Awaitable[bytes]: ...


class Listener(Protocol):
    """Starts serving ``trips`` on the intake port, in the worker process; returns the port.

    Given by the node (pickled to the worker: a module-level class), called
    once per worker, in its main thread; it must not block (it serves on a
    thread of its own) and raises if it cannot listen.
    """

    def __call__(self, trips: Trips) -> int: ...


@dataclass(frozen=True)
class IntakeSpec:
    """What the worker needs to judge and record trips (passed to it once, when it starts)."""

    ledger_path: Path | None
    ledger_url: str | None
    ledger_schema: str
    known_districts: frozenset[str]
    fares: FareSchedule | None
    duplicate_window: timedelta = DEFAULT_DUPLICATE_WINDOW
    late_window: timedelta = DEFAULT_LATE_WINDOW
    changeover_grace: timedelta = CHANGEOVER_GRACE
    cpus: tuple[int, ...] = ()  # the CPUs the worker keeps to (settlement.worker_cpus); (): any

    def open_ledger(self) -> Ledger:
        return open_ledger(
            self.ledger_path, self.ledger_url, self.ledger_schema, self.duplicate_window
        )


class _Backlog:
    """The bytes and requests handed to the desk and not answered yet, bounded."""

    def __init__(self, max_bytes: int, max_requests: int) -> None:
        self.max_bytes = max_bytes
        self.max_requests = max_requests
        self.bytes = 0
        self.requests = 0

    def admit(self, size: int) -> None:
        """Refuse at once, as busy, a request of ``size`` bytes that would overfill the queue.

        A request alone always passes (it would never pass otherwise); the
        bound holds back requests behind others.
        """
        if not self.requests:
            return
        if self.requests >= self.max_requests or self.bytes + size > self.max_bytes:
            raise Busy(
                f"{self.requests} requests ({self.bytes} bytes) are waiting to be recorded",
                RETRY_AFTER_S,
            )

    def hold(self, size: int, work: asyncio.Future[Any]) -> None:
        """Count ``size`` until ``work`` is done (not when the call gives up: a cancelled
        call's request is still worked on, unless it had not started)."""
        self.bytes += size
        self.requests += 1
        work.add_done_callback(lambda done: self._done(size, done))

    def _done(self, size: int, done: asyncio.Future[Any]) -> None:
        self.bytes -= size
        self.requests -= 1
        if not done.cancelled():
            done.exception()  # retrieved: a cancelled call never awaits it


@dataclass(frozen=True)
class _Refused:
    """An :class:`InvalidArgument` from the worker (the only refusal a desk raises)."""

    field: str
    reason: str


@dataclass(frozen=True)
class _Down:
    """The worker's ledger was busy or unreachable (a lock timeout, a lost connection)."""


_Answer = bytes | _Refused | _Down


def _unwrap(outcome: _Answer) -> bytes:
    if isinstance(outcome, _Refused):
        raise InvalidArgument(outcome.field, outcome.reason)
    if isinstance(outcome, _Down):
        raise Unavailable("storage is unavailable; retry later")
    return outcome


class TripIntake:
    """The node's side: hands requests to the worker process, bounded; one request at a time
    is worked on there, in arrival order."""

    def __init__(
        self,
        spec: IntakeSpec,
        clock: Callable[[], datetime],
        max_queued_bytes: int = MAX_QUEUED_BYTES,
        max_queued_requests: int = MAX_QUEUED_REQUESTS,
    ) -> None:
        self._spec = spec
        self._clock = clock
        self._backlog = _Backlog(max_queued_bytes, max_queued_requests)
        self._listener: Listener | None = None
        self.listen_port: int | None = None  # the intake port, once the worker serves it
        # Opened (and migrated) here, at the node's start: a ledger that cannot be opened
        # fails the start, not the first upload. Only the health check uses it.
        self._ledger = spec.open_ledger()
        self._pinger = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-ping")
        self._pool: ProcessPoolExecutor | None = None
        self._closed = False

    @property
    def worker_pid(self) -> int | None:
        """The worker process's id, if one runs (for tests and operators' tools)."""
        processes = getattr(self._pool, "_processes", None) or {}
        return next(iter(processes), None)

    def admit(self, size: int) -> None:
        """Refuse at once, as busy, a request of ``size`` bytes that would overfill the queue
        (a request alone always passes)."""
        self._backlog.admit(size)

    async def submit(self, body: bytes, operator_id: str) -> bytes:
        """The serialized answer to a serialized ``SubmitTripsRequest`` from ``operator_id``,
        once its trips are committed (:meth:`TripDesk.submit`)."""
        self.admit(len(body))
        return await self._run(len(body), _submit, body, operator_id, self._clock())

    async def outcomes(self, operator_id: str, trip_ids: Sequence[str]) -> bytes:
        """The serialized ``SubmitTripsResponse`` of stored outcomes (:meth:`TripDesk.outcomes`),
        read by the worker behind the writes handed to it before."""
        size = sum(len(t) for t in trip_ids)
        self.admit(size)
        return await self._run(size, _outcomes, operator_id, list(trip_ids))

    async def _run(self, size: int, fn: Callable[..., _Answer], *args: Any) -> bytes:
        return _unwrap(await self._call(size, fn, *args))

    async def _call(self, size: int, fn: Callable[..., Any], *args: Any) -> Any:
        if self._closed:
            raise Unavailable("trip intake is closed (the node is stopping)")
        pool = self._executor()
        try:
            work: Future[Any] = pool.submit(fn, *args)
        except BrokenProcessPool as exc:
            raise self._lost(pool) from exc
        answer = asyncio.wrap_future(work)
        self._backlog.hold(size, answer)
        try:
            return await asyncio.shield(answer)
        except BrokenProcessPool as exc:
            raise self._lost(pool) from exc

    async def listen(self, listener: Listener) -> int:
        """Have the worker serve the intake port too, with ``listener``; the port.

        The worker is started now if none runs. Raises what the listener
        raised (e.g. the address is taken). Every worker started after this
        one serves it again (:meth:`keep_listening`).
        """
        self._listener = listener
        port: int = await self._call(0, _listen, listener)
        self.listen_port = port
        return port

    async def keep_listening(self, interval_s: float) -> None:
        """Forever: every ``interval_s``, make sure a worker serves the intake port (a new
        one, at once, if the last one died). For the node's supervisor."""
        while True:
            await asyncio.sleep(interval_s)
            if self._listener is None or self._closed:
                continue
            try:
                await self.listen(self._listener)
            except Unavailable:  # the worker was lost: the next call starts a new one
                await self.listen(self._listener)

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start,
                initargs=(self._spec,),
            )
        return self._pool

    def _lost(self, pool: ProcessPoolExecutor) -> Unavailable:
        if self._pool is pool:
            self._pool = None  # the next request starts a new worker
            pool.shutdown(wait=False, cancel_futures=True)
        if self._listener is not None:
            log.warning("intake_worker_lost", listening=True)
        return Unavailable(
            "the trip intake process stopped before it answered; submit the trips again "
            "(each one committed meanwhile gets its stored outcome)"
        )

    async def reachable(self) -> bool:
        """Whether the ledger answers a trivial query (on the node's own connection)."""
        loop = asyncio.get_running_loop()
        try:  # asyncio.timeout: wait_for on 3.11 may swallow the node's stop (a cancellation)
            async with asyncio.timeout(5):
                return await loop.run_in_executor(self._pinger, self._ledger.ping)
        except Exception:  # any failure is "not reachable"; the node logs the change
            return False

    def close(self) -> None:
        """Stop the worker (after the request it is on) and close the node's connection."""
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pinger.shutdown(wait=True)
        self._ledger.close()


# ---------------------------------------------------------------- in the worker process

_desk: TripDesk | None = None
# Every desk call runs on this one thread (one ledger connection, created on it), whichever
# way the request came in: from the node, or to the intake port.
_desk_thread: ThreadPoolExecutor | None = None
_port: int | None = None


def _start(spec: IntakeSpec) -> None:
    global _desk_thread
    configure_from_env()  # log as the node does, to stderr
    to_background(NICE, spec.cpus)  # SCHED_IDLE: a gate's thread that wakes takes the core at once
    _desk_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="desk")
    _desk_thread.submit(_open_desk, spec).result()


def _open_desk(spec: IntakeSpec) -> None:
    global _desk
    _desk = TripDesk(
        spec.open_ledger(),
        spec.known_districts,
        spec.fares,
        spec.late_window,
        spec.changeover_grace,
    )


def _on_desk(fn: Callable[..., _Answer], *args: Any) -> _Answer:
    assert _desk_thread is not None
    return _desk_thread.submit(fn, *args).result()


def _submit(body: bytes, operator_id: str, now: datetime) -> _Answer:
    return _on_desk(_submit_now, body, operator_id, now)


def _outcomes(operator_id: str, trip_ids: list[str]) -> _Answer:
    return _on_desk(_outcomes_now, operator_id, trip_ids)


def _listen(listener: Listener) -> int:
    global _port
    if _port is None:
        _port = listener(DeskCounter(lambda: datetime.now(UTC)))
        log.info("intake_port_started", port=_port)
    return _port


class DeskCounter:
    """In the worker: the intake port's way to the desk (the calls of :class:`TripIntake`),
    bounded the same way; trips are judged at ``clock()``, the worker's time."""

    def __init__(
        self,
        clock: Callable[[], datetime],
        max_queued_bytes: int = MAX_QUEUED_BYTES,
        max_queued_requests: int = MAX_QUEUED_REQUESTS,
    ) -> None:
        self._clock = clock
        self._backlog = _Backlog(max_queued_bytes, max_queued_requests)

    async def submit(self, body: bytes, operator_id: str) -> bytes:
        self._backlog.admit(len(body))
        return await self._run(len(body), _submit_now, body, operator_id, self._clock())

    async def outcomes(self, operator_id: str, trip_ids: Sequence[str]) -> bytes:
        size = sum(len(t) for t in trip_ids)
        self._backlog.admit(size)
        return await self._run(size, _outcomes_now, operator_id, list(trip_ids))

    async def _run(self, size: int, fn: Callable[..., _Answer], *args: Any) -> bytes:
        answer = asyncio.get_running_loop().run_in_executor(_desk_thread, fn, *args)
        self._backlog.hold(size, answer)
        return _unwrap(await asyncio.shield(answer))


def _submit_now(body: bytes, operator_id: str, now: datetime) -> _Answer:
    assert _desk is not None
    try:
        return _desk.submit(body, operator_id, now)
    except InvalidArgument as exc:
        return _Refused(exc.field, exc.reason)
    except Exception as exc:
        if _storage_down(exc):
            return _Down()
        raise


def _outcomes_now(operator_id: str, trip_ids: list[str]) -> _Answer:
    assert _desk is not None
    try:
        return _desk.outcomes(operator_id, trip_ids)
    except Exception as exc:
        if _storage_down(exc):
            return _Down()
        raise


def _storage_down(exc: BaseException) -> bool:
    """SQLite's or PostgreSQL's OperationalError (busy, locked, connection lost)."""
    if isinstance(exc, sqlite3.OperationalError):
        return True
    module = type(exc).__module__
    return module.startswith("psycopg") and any(
        c.__name__ == "OperationalError" for c in type(exc).__mro__
    )
