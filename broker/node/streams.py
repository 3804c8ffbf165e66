"""Streaming calls in flight and who made them, so that a trust change can end them.

A unary call is judged against the trust in force when it arrives and is over
in moments. A stream outlives that judgement: ``Settlement.ExchangeBatch``
runs up to the sender's 900 s timeout, and connections are no longer cut soon
after ``tls.max_connection_age_s`` — their grace is as long as the longest
exchange (:func:`broker.node.server.server_options`). So the guard records
every streaming call here with the certificate its caller presented, and at
each trust reload every such caller is judged again against the new material
(:meth:`StreamRegistry.refused`): a stream whose caller is now refused — its
certificate revoked, its CA or district no longer trusted, its certificate
expired — is ended with the refusal's status and reason
(:meth:`StreamRegistry.end`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import grpc
import structlog

from broker.core.errors import BrokerError, Busy
from broker.trust.tls import CallerVerifier

log = structlog.get_logger(__name__)

PER_CALLER = 256  # streams of one method one caller may hold open at once
RETRY_S = 5.0


@dataclass(eq=False)
class Stream:
    """One streaming call in flight: its method, its caller, and the certificate presented.

    Attributes:
        method: the full method name, e.g. ``/yikatong.v1.Settlement/ExchangeBatch``.
        caller: the caller's SPIFFE ID, for logs.
        leaf_pem: the caller's certificate, judged again at each trust change.
        context: the call's servicer context (its status is sent through it).
        task: the task running the handler, cancelled when the call is ended.
    """

    method: str
    caller: str
    leaf_pem: bytes
    context: grpc.aio.ServicerContext
    task: asyncio.Task[Any] | None


class StreamRegistry:
    """The streaming calls in flight on one server. Used on the event loop only.

    One caller may hold at most ``per_caller`` calls of one method at once (a
    peer district runs one ``WatchStatus`` per process and home, one
    ``ExchangeBatch`` per close): more is a caller gone wrong, or one trying to
    wear the node down, and the next is refused ``RESOURCE_EXHAUSTED`` until
    one ends.
    """

    def __init__(self, per_caller: int = PER_CALLER) -> None:
        self._per_caller = per_caller
        self._live: set[Stream] = set()
        self._ending: set[asyncio.Future[None]] = set()

    def __len__(self) -> int:
        return len(self._live)

    def count(self, method: str) -> int:
        """How many calls of ``method`` (a full method name) are in flight."""
        return sum(1 for s in self._live if s.method == method)

    @contextlib.contextmanager
    def track(
        self, method: str, caller: str, leaf_pem: bytes, context: grpc.aio.ServicerContext
    ) -> Iterator[Stream]:
        """Hold the call in the registry while its handler runs (in the handler's task);
        :class:`Busy` when the caller holds ``per_caller`` calls of ``method`` already."""
        held = sum(1 for s in self._live if s.method == method and s.caller == caller)
        if held >= self._per_caller:
            raise Busy(f"{held} calls of {method} by this caller are open already", RETRY_S)
        stream = Stream(method, caller, leaf_pem, context, asyncio.current_task())
        self._live.add(stream)
        try:
            yield stream
        finally:
            self._live.discard(stream)

    def refused(self, verifier: CallerVerifier, now: datetime) -> list[tuple[Stream, BrokerError]]:
        """The streams whose callers the trust now in force refuses, each with the refusal."""
        out = []
        for stream in list(self._live):
            try:
                verifier.identify(stream.leaf_pem, now)
            except BrokerError as exc:
                out.append((stream, exc))
        return out

    def end(self, stream: Stream, code: grpc.StatusCode, details: str) -> None:
        """Send the caller ``code`` with ``details`` and stop the handler.

        The status goes out from a task of its own, so a caller that stopped
        reading cannot hold up the trust reload; the handler's task is
        cancelled at once, so its work stops and its clean-up runs.
        """
        self._live.discard(stream)
        ender = asyncio.ensure_future(_abort(stream.context, code, details))
        self._ending.add(ender)
        ender.add_done_callback(self._ending.discard)
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    try:
        await context.abort(code, details)
    except grpc.aio.AbortError:
        pass  # abort() sends the status, then raises this in its caller: here, this task
    except Exception as exc:  # the call ended on its own meanwhile: nothing left to end
        log.info("stream_already_ended", reason=repr(exc))
