"""The one place that reads callers' identities, enforces access rights and maps errors.

Every RPC handler is wrapped: the caller's certificate is turned into an
:class:`~broker.identity.Identity` (refused if unusable), the access policy
is applied, the identity is bound for the servicer to read with
:func:`~broker.identity.current_identity`, and any :class:`BrokerError` the
handler raises becomes a gRPC status here — nowhere else.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import grpc
import structlog

from broker.access import AccessPolicy
from broker.errors import (
    BrokerError,
    ConfigError,
    ImportRejected,
    InvalidArgument,
    PeerUnavailable,
    PermissionDenied,
    Unauthenticated,
)
from broker.identity import Identity, bind_identity, unbind_identity
from broker.metrics import Metrics
from broker.tls import CallerVerifier

log = structlog.get_logger(__name__)

_STATUS: tuple[tuple[type[BrokerError], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (ImportRejected, grpc.StatusCode.INVALID_ARGUMENT),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PeerUnavailable, grpc.StatusCode.UNAVAILABLE),
    (ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
)


def status_for(exc: BrokerError) -> grpc.StatusCode:
    """The gRPC status code of a broker error."""
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Identity, access rights, error mapping and in-node timing for every method."""

    def __init__(
        self,
        verifier: CallerVerifier,
        policy: AccessPolicy,
        metrics: Metrics,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._verifier = verifier
        self._policy = policy
        self._metrics = metrics
        self._clock = clock
        # Wrapped handlers, built once per method rather than once per call.
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def _identify(self, method: str, context: grpc.aio.ServicerContext) -> Identity:
        auth = context.auth_context()
        pems = auth.get("x509_pem_cert")
        if not pems:
            raise Unauthenticated("no client certificate")
        ident = self._verifier.identify(pems[0], self._clock())
        self._policy.authorize(method, ident)
        return ident

    async def _fail(
        self, context: grpc.aio.ServicerContext, method: str, who: str, exc: BrokerError
    ) -> None:
        code = status_for(exc)
        if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
            log.warning("call_refused", method=method, caller=who, code=code.name, reason=str(exc))
        await context.abort(code, str(exc))

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(details)
        if handler is None:
            return None
        wrapped = handler
        if handler.unary_unary is not None:
            wrapped = handler._replace(unary_unary=self._wrap_unary(method, handler.unary_unary))
        for kind in ("unary_stream", "stream_unary", "stream_stream"):
            inner = getattr(handler, kind)
            if inner is not None:
                wrapped = handler._replace(**{kind: self._wrap_other(method, inner)})
        self._wrapped[method] = wrapped
        return wrapped

    def _wrap_unary(self, method: str, inner: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        recorder = self._metrics.recorder(method)

        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter_ns()
            who = "-"
            try:
                ident = self._identify(method, context)
                who = ident.spiffe_id
                token = bind_identity(ident)
                try:
                    return await inner(request, context)
                finally:
                    unbind_identity(token)
            except BrokerError as exc:
                await self._fail(context, method, who, exc)
            except grpc.aio.AbortError:
                raise
            except Exception:
                log.exception("handler_failed", method=method, caller=who)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")
            finally:
                recorder.record(time.perf_counter_ns() - started)

        return behavior

    def _wrap_other(self, method: str, inner: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(inner):

            async def gen_behavior(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                try:
                    ident = self._identify(method, context)
                except BrokerError as exc:
                    await self._fail(context, method, "-", exc)
                    return
                token = bind_identity(ident)
                try:
                    async for item in inner(request, context):
                        yield item
                finally:
                    unbind_identity(token)

            return gen_behavior

        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                ident = self._identify(method, context)
            except BrokerError as exc:
                await self._fail(context, method, "-", exc)
                return None
            token = bind_identity(ident)
            try:
                return await inner(request, context)
            finally:
                unbind_identity(token)

        return behavior
