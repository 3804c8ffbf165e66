"""The one place that reads callers' identities, enforces access rights and maps errors.

Every RPC handler is wrapped: the caller's certificate is turned into an
:class:`~broker.trust.identity.Identity` (refused if unusable), the access policy
is applied, the identity is bound for the servicer to read with
:func:`~broker.trust.identity.current_identity`, and any :class:`BrokerError` the
handler raises becomes a gRPC status here — nowhere else.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import grpc
import structlog

from broker.core.errors import (
    BrokerError,
    ConfigError,
    Conflict,
    DocumentRefused,
    ImportRejected,
    InvalidArgument,
    PeerUnavailable,
    PermissionDenied,
    SettlementStateError,
    Unauthenticated,
)
from broker.node.metrics import Metrics
from broker.trust.access import AccessPolicy
from broker.trust.identity import Identity, bind_identity, unbind_identity
from broker.trust.tls import CallerVerifier, check_tls_version

log = structlog.get_logger(__name__)

_STATUS: tuple[tuple[type[BrokerError], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (ImportRejected, grpc.StatusCode.INVALID_ARGUMENT),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PeerUnavailable, grpc.StatusCode.UNAVAILABLE),
    (ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
    (DocumentRefused, grpc.StatusCode.INVALID_ARGUMENT),
    (Conflict, grpc.StatusCode.ALREADY_EXISTS),
    (SettlementStateError, grpc.StatusCode.FAILED_PRECONDITION),
)


def status_for(exc: BrokerError) -> grpc.StatusCode:
    """The gRPC status code of a broker error."""
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


class AuthInterceptor:
    """Identity, access rights, error mapping and in-node timing for every method.

    It intercepts by wrapping each method handler once, when the servicers
    are registered (see :class:`GuardedServer`), rather than as a
    ``grpc.aio.ServerInterceptor``: grpc.aio runs its interceptor chain as
    coroutines on every call, which measured ~10 % of a loopback RPC's cost
    here (scripts/bench), for no gain.
    """

    def __init__(
        self,
        verifier: CallerVerifier,
        policy: AccessPolicy,
        metrics: Metrics,
        min_tls: str = "1.3",
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._verifier = verifier
        self._policy = policy
        self._metrics = metrics
        self._min_tls = min_tls
        self._clock = clock

    def _identify(self, method: str, context: grpc.aio.ServicerContext) -> Identity:
        auth = context.auth_context()
        pems = auth.get("x509_pem_cert")
        if not pems:
            raise Unauthenticated("no client certificate")
        check_tls_version(auth.get("ssl_tls_version"), self._min_tls)
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

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The handler with identity, access rights, error mapping and timing around it."""
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._wrap_unary(method, handler.unary_unary))
        for kind in ("unary_stream", "stream_unary", "stream_stream"):
            inner = getattr(handler, kind)
            if inner is not None:
                return handler._replace(**{kind: self._wrap_other(method, inner)})
        return handler

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
                except BrokerError as exc:
                    await self._fail(context, method, ident.spiffe_id, exc)
                except grpc.aio.AbortError:
                    raise
                except Exception:
                    log.exception("handler_failed", method=method, caller=ident.spiffe_id)
                    await context.abort(grpc.StatusCode.INTERNAL, "internal error")
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
            except BrokerError as exc:
                await self._fail(context, method, ident.spiffe_id, exc)
                return None
            except grpc.aio.AbortError:
                raise
            except Exception:
                log.exception("handler_failed", method=method, caller=ident.spiffe_id)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")
            finally:
                unbind_identity(token)

        return behavior


class GuardedServer:
    """Stands in for the server when servicers register, so that every handler is guarded.

    Pass it to generated ``add_*Servicer_to_server`` functions: each service's
    handlers reach the real server only wrapped by the :class:`AuthInterceptor`.
    """

    def __init__(self, server: grpc.aio.Server, guard: AuthInterceptor) -> None:
        self._server = server
        self._guard = guard
        self._generic = 0
        self._registered = 0

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        # Generated code registers the same methods again, as a dictionary, right after.
        self._generic += len(handlers)

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        self._registered += 1
        wrapped = {name: self._guard.wrap(f"/{service}/{name}", h) for name, h in handlers.items()}
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, wrapped),)
        )
        self._server.add_registered_method_handlers(service, wrapped)

    def check_complete(self) -> None:
        """Refuse a servicer that registered only opaque generic handlers: it would go unguarded."""
        if self._generic != self._registered:
            raise ConfigError("a servicer registered handlers this node cannot guard")
