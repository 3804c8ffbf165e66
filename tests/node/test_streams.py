"""The registry of streaming calls in flight (broker/node/streams.py).

Here with stand-ins for the verifier and the servicer context; through a
running node, tests/e2e/test_long_exchange.py ends a revoked caller's
ExchangeBatch at the trust change, and tests/e2e/test_bounded_batches.py
checks a cancelled call leaves the registry.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any, cast

import grpc
import pytest

from broker.core.errors import Busy, PermissionDenied
from broker.node.streams import Stream, StreamRegistry
from broker.trust.tls import CallerVerifier

NOW = datetime(2026, 11, 28, 8, 0, tzinfo=UTC)
METHOD = "/yikatong.v1.Settlement/ExchangeBatch"


class Context:
    """What the registry uses of a servicer context: abort, which sends the status."""

    def __init__(self, already_ended: bool = False) -> None:
        self.aborted: list[tuple[grpc.StatusCode, str]] = []
        self._ended = already_ended

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        if self._ended:
            raise grpc.aio.UsageError("RPC already finished.")
        self.aborted.append((code, details))
        raise grpc.aio.AbortError()


class Verifier:
    """Refuses the certificates it was told are revoked."""

    def __init__(self, revoked: set[bytes]) -> None:
        self.revoked = revoked
        self.asked: list[tuple[bytes, datetime]] = []

    def identify(self, leaf_pem: bytes, now: datetime) -> object:
        self.asked.append((leaf_pem, now))
        if leaf_pem in self.revoked:
            raise PermissionDenied("certificate 1f has been revoked")
        return object()


def as_verifier(v: Verifier) -> CallerVerifier:
    return cast(CallerVerifier, v)


def as_context(c: Context) -> grpc.aio.ServicerContext:
    return cast(Any, c)


async def test_a_stream_is_held_while_its_handler_runs_and_let_go_after_even_on_error():
    streams = StreamRegistry()
    with streams.track(METHOD, "spiffe://a", b"pem", as_context(Context())) as stream:
        assert len(streams) == 1
        assert stream.task is asyncio.current_task()
    assert len(streams) == 0
    with pytest.raises(RuntimeError), streams.track(METHOD, "s", b"p", as_context(Context())):
        raise RuntimeError("the handler failed")
    assert len(streams) == 0


async def test_every_caller_is_judged_again_and_only_the_refused_are_named():
    streams = StreamRegistry()
    verifier = Verifier(revoked={b"revoked"})
    with (
        streams.track(METHOD, "spiffe://ok", b"fine", as_context(Context())),
        streams.track(METHOD, "spiffe://gone", b"revoked", as_context(Context())),
    ):
        refused = streams.refused(as_verifier(verifier), NOW)
        assert [(s.caller, str(e)) for s, e in refused] == [
            ("spiffe://gone", "certificate 1f has been revoked")
        ]
        assert sorted(verifier.asked) == [(b"fine", NOW), (b"revoked", NOW)]


async def test_ending_a_stream_sends_its_status_and_cancels_its_handler():
    streams = StreamRegistry()
    context = Context()
    running = asyncio.Event()

    async def handler() -> None:
        with streams.track(METHOD, "spiffe://gone", b"revoked", as_context(context)):
            running.set()
            await asyncio.Event().wait()  # a stream waiting for its next message

    task = asyncio.create_task(handler())
    await running.wait()
    (stream, _), *_ = streams.refused(as_verifier(Verifier({b"revoked"})), NOW)
    streams.end(stream, grpc.StatusCode.PERMISSION_DENIED, "revoked; ended at a trust change")
    assert len(streams) == 0
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)  # the status goes out from a task of its own
    assert context.aborted == [
        (grpc.StatusCode.PERMISSION_DENIED, "revoked; ended at a trust change")
    ]


async def test_ending_a_stream_that_finished_meanwhile_is_harmless():
    streams = StreamRegistry()

    async def handler() -> Stream:
        with streams.track(METHOD, "s", b"p", as_context(Context(already_ended=True))) as s:
            return s

    stream = await asyncio.create_task(handler())
    streams.end(stream, grpc.StatusCode.PERMISSION_DENIED, "too late")
    for _ in range(3):
        await asyncio.sleep(0)
    assert len(streams) == 0


async def test_one_caller_holds_a_bounded_number_of_streams_of_one_method():
    streams = StreamRegistry(per_caller=2)
    with (
        streams.track(METHOD, "spiffe://a", b"p", as_context(Context())),
        streams.track(METHOD, "spiffe://a", b"p", as_context(Context())),
    ):
        with (
            pytest.raises(Busy, match="2 calls of"),
            streams.track(METHOD, "spiffe://a", b"p", as_context(Context())),
        ):
            pass  # pragma: no cover - refused before
        # another caller, or another method of the same caller, is not held up
        with streams.track(METHOD, "spiffe://b", b"p", as_context(Context())):
            assert len(streams) == 3
        with streams.track("/yikatong.v1.Other/Watch", "spiffe://a", b"p", as_context(Context())):
            assert len(streams) == 3
    with streams.track(METHOD, "spiffe://a", b"p", as_context(Context())):  # room again
        assert len(streams) == 1
