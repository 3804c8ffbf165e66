"""The home's verification of received batches, in a process of its own.

Verifying a big batch is seconds to minutes of Python work per million lines;
on a thread of the node's process it would hold the interpreter lock against
the event loop that answers gates. So it runs in one worker process per node
(spawned at the first batch, niced), with its own connections to the
registry and the clearing store. The node hands it the spool by path (its
``/proc/<pid>/fd/<n>``: the file has no name on disk), the sender's settlement
keys as PEM and the node's ``now``; the worker reads the spool read-only,
works its digest out again, and answers the acknowledgement, or the refusal
as (kind, message). A worker that dies (killed, crashed) fails the call
``UNAVAILABLE``; the next batch starts a new one. Nothing it had not
committed is kept: the sender sends the batch again.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from broker.cards.config import RegistryConfig
from broker.cards.registry import Registry
from broker.core.errors import (
    BrokerError,
    Conflict,
    DocumentRefused,
    PeerUnavailable,
    SettlementStateError,
)
from broker.core.logs import configure_from_env
from broker.core.priority import to_background
from broker.core.signing import PublicKey, Signed, Signer, parse_public_keys, public_key_pems
from broker.fares.rules import load_fares
from broker.settlement.clearing import crash
from broker.settlement.clearing.batch import Spool
from broker.settlement.clearing.receiver import Ack, Receiver
from broker.settlement.clearing.store import ClearingStore
from broker.settlement.clearing.tail import End, EndPipe, Hint, Tail
from broker.settlement.config import SettlementSettings

NICE = 10  # below the node's own threads: the gates come first
_REFUSALS: dict[str, type[BrokerError]] = {
    "DocumentRefused": DocumentRefused,
    "Conflict": Conflict,
    "SettlementStateError": SettlementStateError,
}


@dataclass(frozen=True)
class Job:
    sender: str
    path: str  # the spool, as this process can open it
    trailer: Signed
    keys: tuple[tuple[str, str], ...]  # the sender's settlement keys, (key id, PEM)
    now: datetime


@dataclass(frozen=True)
class Refusal:
    kind: str
    message: str

    def error(self) -> BrokerError:
        # Errors of one message only: the others do not cross a process as they are.
        return _REFUSALS.get(self.kind, DocumentRefused)(self.message)


@dataclass(frozen=True)
class StreamJob:
    sender: str
    path: str  # the spool, as this process can open it; still being written
    end_path: str  # the node's pipe: how the stream ended (broker.settlement.clearing.tail)
    hint: Hint


class Streamed:
    """A batch being verified as it arrives (:meth:`Verifier.stream`)."""

    def __init__(
        self,
        work: asyncio.Future[Ack | None],
        pipe: EndPipe,
        keys_of: Callable[[str], Mapping[str, PublicKey]],
        clock: Callable[[], datetime],
    ) -> None:
        self.work = work
        self._pipe = pipe
        self._keys_of = keys_of
        self._clock = clock

    def end(self, sender: str, trailer: Signed | None) -> None:
        """Tell the worker how the stream ended: with ``trailer``, or broken off (``None``:
        nothing of it is committed)."""
        if trailer is None:
            self._pipe.end(None)
            return
        try:
            end = End(trailer, public_key_pems(self._keys_of(sender)), self._clock())
        except BaseException:
            self._pipe.end(None)
            raise
        self._pipe.end(end)

    def abandon(self) -> None:
        """The stream broke off: end it, and let the worker's outcome go unread."""
        self.end("", None)
        self.work.add_done_callback(_retrieved)


def _retrieved(work: asyncio.Future[Ack | None]) -> None:
    if not work.cancelled():
        work.exception()


class Verifier:
    """Runs :meth:`Receiver.receive` in the worker process; one batch at a time."""

    def __init__(
        self,
        cfg: SettlementSettings,
        registry_path: RegistryConfig | Path,
        keys_of: Callable[[str], Mapping[str, PublicKey]],
        clock: Callable[[], datetime],
    ) -> None:
        self._cfg = cfg
        self._registry_path = registry_path
        self._keys_of = keys_of
        self._clock = clock
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start,
                initargs=(self._cfg, self._registry_path),
            )
        return self._pool

    def stream(self, sender: str, spool: Spool, hint: Hint) -> Streamed:
        """Start verifying ``sender``'s batch as ``spool`` fills (:mod:`broker.settlement.
        clearing.tail`); the node says how the stream ended with :meth:`Streamed.end`."""
        pipe = EndPipe()
        job = StreamJob(sender, f"/proc/{os.getpid()}/fd/{spool.file.fileno()}", pipe.path, hint)
        work = asyncio.ensure_future(self._outcome(_verify_streamed, job))
        work.add_done_callback(lambda _: pipe.close())  # the worker is done with the read end
        return Streamed(work, pipe, self._keys_of, self._clock)

    async def _outcome(self, fn: Callable[[Any], Ack | Refusal | None], job: Any) -> Ack | None:
        pool = self._executor()
        try:
            outcome = await asyncio.get_running_loop().run_in_executor(pool, fn, job)
        except BrokenProcessPool as exc:
            if self._pool is pool:
                self._pool = None  # the next batch starts a new worker
            raise PeerUnavailable(
                self._cfg.district,
                "the verification process stopped before it answered; send the batch again",
            ) from exc
        if isinstance(outcome, Refusal):
            raise outcome.error()
        return outcome

    async def receive(self, sender: str, spool: Spool, trailer: Signed) -> Ack:
        job = Job(
            sender,
            f"/proc/{os.getpid()}/fd/{spool.file.fileno()}",
            trailer,
            public_key_pems(self._keys_of(sender)),
            self._clock(),
        )
        outcome = await self._outcome(_verify, job)
        assert outcome is not None
        return outcome

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


# ---------------------------------------------------------------- in the worker process

_receiver: Receiver | None = None
_store: ClearingStore | None = None
_job: Job | None = None


def _start(cfg: SettlementSettings, registry_path: RegistryConfig | Path) -> None:
    global _receiver, _store
    configure_from_env()  # log as the node does, to stderr
    # SCHED_IDLE: a niced worker keeps its slice when a gate thread wakes; on the workers' CPUs
    to_background(NICE, cfg.settlement.worker_cpus)
    assert cfg.settlement.key_file is not None
    _store = ClearingStore.open(cfg).for_verification()
    _receiver = Receiver(
        cfg.district,
        _store,
        Signer.from_file(cfg.settlement.key_file),
        Registry(registry_path),
        lambda district: parse_public_keys(_job.keys) if _job is not None else {},
        cfg.agreement,
        load_fares(cfg.fares.file) if cfg.fares.file else None,
        lambda: _job.now if _job is not None else datetime.now().astimezone(),
        timedelta(seconds=cfg.fares.changeover_grace_s),
    )


def _verify_streamed(job: StreamJob) -> Ack | Refusal | None:
    global _job
    assert _receiver is not None
    crash.point("verify_started")  # test hook: before the spool is read
    tail = Tail(job.path, job.end_path)

    def trailer() -> Signed:
        global _job
        end = tail.end()
        assert end is not None  # the chunks ended with the trailer
        _job = Job(job.sender, job.path, end.trailer, end.keys, end.now)
        return end.trailer

    try:
        return _receiver.receive_streamed(job.sender, job.hint, tail.chunks(), tail.digest, trailer)
    except BrokerError as exc:
        return Refusal(type(exc).__name__, str(exc))
    finally:
        tail.close()
        _job = None
        _checkpoint_soon()


def _verify(job: Job) -> Ack | Refusal:
    global _job
    assert _receiver is not None
    _job = job
    crash.point("verify_started")  # test hook: before the spool is read
    spool = Spool.reopened(job.path)
    try:
        return _receiver.receive(job.sender, spool, job.trailer)
    except BrokerError as exc:
        return Refusal(type(exc).__name__, str(exc))
    finally:
        spool.close()
        _job = None
        _checkpoint_soon()


def _checkpoint_soon() -> None:
    """The batch's log into the file once the answer is on its way (the answer is
    durable already): the next batch waits for it, the node's answer does not."""
    assert _store is not None
    _store.checkpoint_soon()
