"""The one place that reads callers' identities, enforces access rights and maps errors.

Every RPC handler is wrapped: the caller's certificate is turned into an
:class:`~broker.trust.identity.Identity` (refused if unusable), the access policy
is applied, the raw request bytes are decoded (only now: a refused caller's
bytes are never parsed), the identity is bound for the servicer to read with
:func:`~broker.trust.identity.current_identity`, and whatever the handler
raises becomes a gRPC status here — nowhere else, and never UNKNOWN.
"""

from __future__ import annotations

import inspect
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import grpc
import structlog
from cryptography import x509

from broker.core.errors import (
    BrokerError,
    Busy,
    ConfigError,
    Conflict,
    DocumentRefused,
    ImportRejected,
    InvalidArgument,
    LimitExceeded,
    PeerUnavailable,
    PermissionDenied,
    SettlementStateError,
    Unauthenticated,
    Unavailable,
)
from broker.node.metrics import Metrics
from broker.node.streams import StreamRegistry
from broker.trust.access import AccessPolicy, is_operator_method, require_operator
from broker.trust.identity import Identity, bind_identity, unbind_identity
from broker.trust.tls import CallerVerifier, check_tls_version, spiffe_ids

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
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Busy, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (SettlementStateError, grpc.StatusCode.FAILED_PRECONDITION),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
)


def status_for(exc: BrokerError) -> grpc.StatusCode:
    """The gRPC status code of a broker error."""
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


MAX_TRACKED = 10_000  # refusing callers remembered for the rate limit


class RefusalLog:
    """Logs refused calls without letting one misbehaving caller flood the log.

    The first refusal of a (caller, method, code) is logged with its reason;
    later ones within ``period_s`` are only counted, and the count is logged
    with the next refusal after the period (``call_refused_repeated``).
    """

    def __init__(self, period_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._period = period_s
        self._clock = clock
        self._seen: dict[tuple[str, str, str], tuple[float, int]] = {}

    def refused(self, method: str, caller: str, code: grpc.StatusCode, reason: str) -> None:
        key = (caller, method, code.name)
        now = self._clock()
        held = self._seen.get(key)
        if held is None:
            log.warning("call_refused", method=method, caller=caller, code=code.name, reason=reason)
            if len(self._seen) >= MAX_TRACKED:  # callers come and go (or are made up)
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self._period}
                if len(self._seen) >= MAX_TRACKED:
                    self._seen.clear()
            self._seen[key] = (now, 0)
            return
        since, count = held
        if now - since < self._period:
            self._seen[key] = (since, count + 1)
            return
        log.warning(
            "call_refused_repeated",
            method=method,
            caller=caller,
            code=code.name,
            reason=reason,
            count=count + 1,
            seconds=round(now - since),
        )
        self._seen[key] = (now, 0)


def _as_is(data: bytes) -> bytes:
    return data


def decoder(method: str, deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    """How a method's raw request bytes become its message; failure is INVALID_ARGUMENT.

    Handlers are registered with no deserializer, so that grpc hands over
    bytes and this guard decodes them only after the caller is authorized.
    """
    if deserialize is None:
        return _as_is
    owner = getattr(deserialize, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    type_name = getattr(descriptor, "full_name", None) or f"the request of {method}"

    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:  # DecodeError, invalid UTF-8 in a string field, ...
            raise InvalidArgument("request", f"does not decode as {type_name}") from None

    return decode


class AuthInterceptor:
    """Identity, access rights, decoding, error mapping and in-node timing for every method.

    It intercepts by wrapping each method handler once, when the servicers
    are registered (see :class:`GuardedServer`), rather than as a
    ``grpc.aio.ServerInterceptor``: grpc.aio runs its interceptor chain as
    coroutines on every call, which measured ~10 % of a loopback RPC's cost
    here (scripts/bench), for no gain.

    Order on every call: identify the caller, authorize the method, then
    decode the request (stream messages as they are read), then bind the
    operator (a request's ``operator_id`` must be the caller's own), then
    run the handler. A refused caller gets PERMISSION_DENIED whatever it
    sent; a body that does not decode gets INVALID_ARGUMENT naming its type.
    A method named in ``undecoded`` (SubmitTrips) gets its raw bytes instead,
    decoded elsewhere (the intake's worker process), and a handler may answer
    with bytes serialized already.
    A streaming call is held in :attr:`streams` while it runs, and
    :meth:`end_refused_streams` ends those whose callers a trust change refuses.
    """

    def __init__(
        self,
        verifier: CallerVerifier,
        policy: AccessPolicy,
        metrics: Metrics,
        min_tls: str = "1.3",
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        refusals: RefusalLog | None = None,
        streams: StreamRegistry | None = None,
        undecoded: frozenset[str] = frozenset(),
    ) -> None:
        """``undecoded``: methods (``/package.Service/Method``) whose handler takes the raw
        request bytes and decodes them elsewhere (SubmitTrips: in the intake's worker
        process); their request type may have no ``operator_id`` for this guard to check."""
        self.streams = streams or StreamRegistry()
        self._undecoded = undecoded
        self._verifier = verifier
        self._policy = policy
        self._metrics = metrics
        self._min_tls = min_tls
        self._clock = clock
        self._refusals = refusals or RefusalLog()

    def _identify(self, context: grpc.aio.ServicerContext) -> Identity:
        auth = context.auth_context()
        pems = auth.get("x509_pem_cert")
        if not pems:
            raise Unauthenticated("no client certificate")
        check_tls_version(auth.get("ssl_tls_version"), self._min_tls)
        return self._verifier.identify(pems[0], self._clock())

    def end_refused_streams(self) -> int:
        """End every stream whose caller the trust now in force refuses (at a trust reload).

        The caller gets the refusal's status (PERMISSION_DENIED for a revoked
        certificate) with its reason; how many streams were ended.
        """
        refused = self.streams.refused(self._verifier, self._clock())
        for stream, exc in refused:
            code, reason = outcome_of(exc)
            log.warning(
                "stream_ended_at_trust_change",
                method=stream.method,
                caller=stream.caller,
                code=code.name,
                reason=reason,
            )
            self.streams.end(stream, code, f"{reason}; the stream was ended at a trust change")
        return len(refused)

    async def _fail(
        self, context: grpc.aio.ServicerContext, method: str, who: str, exc: BaseException
    ) -> None:
        code, message = outcome_of(exc)
        if who == "-":
            who = _caller_of(context)
        if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
            self._refusals.refused(method, who, code, message)
        elif code is grpc.StatusCode.INTERNAL:
            log.error("handler_failed", method=method, caller=who, exc_info=exc)
        await context.abort(code, message)

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The handler with identity, access rights, decoding, error mapping and timing."""
        if method in self._undecoded:
            if _takes_operator_id(handler.request_deserializer):
                raise ConfigError(f"{method} names an operator: its request must be decoded")
            decode: Callable[[bytes], Any] = _as_is
        else:
            decode = decoder(method, handler.request_deserializer)
        raw = handler._replace(
            request_deserializer=None, response_serializer=_encoder(handler.response_serializer)
        )
        for kind, stream, long_lived in (
            ("unary_unary", False, False),
            ("unary_stream", False, True),
            ("stream_unary", True, True),
            ("stream_stream", True, True),
        ):
            inner = getattr(handler, kind)
            if inner is not None:
                wrapped = self._wrap(method, inner, decode, stream, long_lived)
                return raw._replace(**{kind: wrapped})
        return handler

    def _admit(
        self,
        method: str,
        ident: Identity,
        request: Any,
        decode: Callable[[bytes], Any],
        stream: bool,
    ) -> Any:
        """Authorize, decode, bind the operator: the request as the handler sees it."""
        self._policy.authorize(method, ident)
        if stream:
            return _decoded(request, decode)
        message = decode(request)
        if is_operator_method(method) and _has_operator_id(message):
            require_operator(ident, message.operator_id)
        return message

    def _wrap(
        self,
        method: str,
        inner: Callable[..., Any],
        decode: Callable[[bytes], Any],
        stream: bool,
        long_lived: bool,
    ) -> Callable[..., Any]:
        """``stream``: the request is streamed; ``long_lived``: either side streams (such a
        call, e.g. Health.Watch written as a coroutine that writes, is tracked so that a
        revoked caller's is ended at the next trust change)."""
        recorder = self._metrics.recorder(method)
        if inspect.isasyncgenfunction(inner):

            async def gen_behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
                who = "-"
                try:
                    ident = self._identify(context)
                    who = ident.spiffe_id
                    message = self._admit(method, ident, request, decode, stream)
                except BrokerError as exc:
                    await self._fail(context, method, who, exc)
                    return
                token = bind_identity(ident)
                try:
                    with self.streams.track(method, who, _leaf_pem(context), context):
                        async for item in inner(message, context):
                            yield item
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await self._fail(context, method, ident.spiffe_id, exc)
                finally:
                    unbind_identity(token)

            return gen_behavior

        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter_ns()
            who = "-"
            try:
                ident = self._identify(context)
                who = ident.spiffe_id
                message = self._admit(method, ident, request, decode, stream)
                token = bind_identity(ident)
                try:
                    if not long_lived:
                        result = await inner(message, context)
                    else:
                        with self.streams.track(method, who, _leaf_pem(context), context):
                            result = await inner(message, context)
                finally:
                    unbind_identity(token)
            except grpc.aio.AbortError:
                recorder.record(time.perf_counter_ns() - started)
                raise
            except Exception as exc:
                # recorded before the status goes out: abort sends it, and a caller that
                # has its answer may read the metrics at once
                recorder.record(time.perf_counter_ns() - started)
                await self._fail(context, method, who, exc)
                return None
            recorder.record(time.perf_counter_ns() - started)
            return result

        return behavior


def outcome_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and message a call ends with for ``exc``: never UNKNOWN.

    Errors of the one tree map by kind; storage that is busy or unreachable is
    UNAVAILABLE (the caller may retry); anything else is INTERNAL, logged with
    its traceback by the guard.
    """
    if isinstance(exc, BrokerError):
        return status_for(exc), str(exc)
    if isinstance(exc, sqlite3.OperationalError) or _is_psycopg_operational(exc):
        return grpc.StatusCode.UNAVAILABLE, "storage is unavailable; retry later"
    if isinstance(exc, NotImplementedError):  # a library servicer's method not implemented
        return grpc.StatusCode.UNIMPLEMENTED, "method not implemented"
    return grpc.StatusCode.INTERNAL, "internal error"


def _is_psycopg_operational(exc: BaseException) -> bool:
    module = type(exc).__module__
    return module.startswith("psycopg") and any(
        c.__name__ == "OperationalError" for c in type(exc).__mro__
    )


def _caller_of(context: grpc.aio.ServicerContext) -> str:
    """The SPIFFE ID the caller's certificate names, for logs of refusals ("-" if none)."""
    try:
        pems = context.auth_context().get("x509_pem_cert")
        ids = spiffe_ids(x509.load_pem_x509_certificate(pems[0])) if pems else []
    except Exception:  # a certificate that does not parse is named by nothing
        return "-"
    return ids[0] if len(ids) == 1 else "-"


def _leaf_pem(context: grpc.aio.ServicerContext) -> bytes:
    """The certificate the caller presented (``_identify`` has judged it already)."""
    return bytes(context.auth_context()["x509_pem_cert"][0])


def _encoder(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """A method's response serializer that passes bytes through: a handler may answer bytes
    serialized already (by a worker process, e.g. SubmitTrips')."""
    if serialize is None:
        return None

    def encode(message: Any) -> bytes:
        return message if isinstance(message, bytes) else serialize(message)

    return encode


def _has_operator_id(message: Any) -> bool:
    descriptor = getattr(message, "DESCRIPTOR", None)
    return descriptor is not None and "operator_id" in descriptor.fields_by_name


def _takes_operator_id(deserialize: Callable[[bytes], Any] | None) -> bool:
    descriptor = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    return descriptor is None or "operator_id" in descriptor.fields_by_name


async def _decoded(requests: AsyncIterator[bytes], decode: Callable[[bytes], Any]) -> Any:
    async for data in requests:
        yield decode(data)


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
