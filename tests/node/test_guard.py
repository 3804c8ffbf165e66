"""The call guard (broker/node/guard.py): error-to-status mapping, identity, access, timing.

Most checks drive :class:`AuthInterceptor` directly with a stand-in servicer context
(so that a handler can raise anything, and see what it sees); one runs through a
real node to show the guard in place on every registered handler.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, cast

import grpc
import pytest

from broker._proto.yikatong.v1 import gate_pb2, gate_pb2_grpc, settlement_pb2, settlement_pb2_grpc
from broker.cards.model import CardRef
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
    RowError,
    SettlementStateError,
    Unauthenticated,
    Unavailable,
)
from broker.node.guard import AuthInterceptor, GuardedServer, status_for
from broker.node.metrics import Metrics
from broker.trust import certops
from broker.trust.access import AccessPolicy
from broker.trust.identity import Identity, current_identity, node_identity, operator_identity
from broker.trust.tls import CallerVerifier
from tests.conftest import ANYUE, DAZU, Cluster
from tests.helpers import (
    caller_channel,
    check_request,
    gate_stub,
    node_channel,
    recognition_stub,
    recognize_request,
)

CHECK = "/yikatong.v1.Gate/Check"
RECOGNIZE = "/yikatong.v1.Recognition/Recognize"
OPERATOR = operator_identity(DAZU, "transit-01")
PEER_NODE = node_identity(ANYUE)
CODE = grpc.StatusCode


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (InvalidArgument("card", "is required"), CODE.INVALID_ARGUMENT),
        (ImportRejected([RowError(2, "bad")]), CODE.INVALID_ARGUMENT),
        (DocumentRefused("digest differs"), CODE.INVALID_ARGUMENT),
        (PermissionDenied("no"), CODE.PERMISSION_DENIED),
        (Unauthenticated("no certificate"), CODE.UNAUTHENTICATED),
        (PeerUnavailable(ANYUE, "timed out"), CODE.UNAVAILABLE),
        (ConfigError("no key"), CODE.FAILED_PRECONDITION),
        (SettlementStateError("not closed"), CODE.FAILED_PRECONDITION),
        (Conflict("sequence 1 reused"), CODE.ALREADY_EXISTS),
        (Busy("40000 trips are waiting", 1.0), CODE.RESOURCE_EXHAUSTED),
        (LimitExceeded("settlement.max_batch_lines", 3, "lines"), CODE.RESOURCE_EXHAUSTED),
        (Unavailable("the intake process stopped"), CODE.UNAVAILABLE),
    ],
)
def test_status_for_maps_each_broker_error_to_its_grpc_status(
    exc: BrokerError, code: grpc.StatusCode
) -> None:
    """Each kind in the error tree (broker/core/errors.py) has the status the guard documents."""
    assert status_for(exc) == code


def test_status_for_a_subclass_follows_its_parent_and_an_unknown_kind_is_internal() -> None:
    """Mapping is by isinstance; a BrokerError of no listed kind is INTERNAL, not OK/UNKNOWN."""

    class NarrowArgument(InvalidArgument):
        pass

    class Unlisted(BrokerError):
        pass

    assert status_for(NarrowArgument("x", "y")) == CODE.INVALID_ARGUMENT
    assert status_for(Unlisted("z")) == CODE.INTERNAL
    assert status_for(BrokerError("bare")) == CODE.INTERNAL


# --- AuthInterceptor driven directly ------------------------------------------------------


class FakeContext:
    """Enough of ``grpc.aio.ServicerContext`` for the guard: auth context and abort."""

    def __init__(self, pem: bytes | None = b"operator", tls: bytes = b"TLSv1.3") -> None:
        self._auth: dict[str, list[bytes]] = {"ssl_tls_version": [tls]}
        if pem is not None:
            self._auth["x509_pem_cert"] = [pem]
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self.aborted = (code, details)
        raise grpc.aio.AbortError()  # as grpc.aio's context does


class FakeVerifier:
    """Names the caller by the (fake) certificate bytes."""

    def __init__(self) -> None:
        self.identities = {b"operator": OPERATOR, b"peer-node": PEER_NODE}
        self.seen: list[datetime] = []

    def identify(self, leaf_pem: bytes, now: datetime) -> Identity:
        self.seen.append(now)
        ident = self.identities.get(leaf_pem)
        if ident is None:
            raise PermissionDenied("certificate names no yikatong identity")
        return ident


def make_guard(metrics: Metrics | None = None) -> AuthInterceptor:
    return AuthInterceptor(
        cast(CallerVerifier, FakeVerifier()),
        AccessPolicy(DAZU, frozenset({ANYUE})),
        metrics or Metrics(),
        "1.3",
        lambda: datetime(2026, 11, 2, tzinfo=UTC),
    )


def unary(method: str, fn: Any, metrics: Metrics | None = None) -> Any:
    return make_guard(metrics).wrap(method, grpc.unary_unary_rpc_method_handler(fn)).unary_unary


async def call_refused(behavior: Any, ctx: FakeContext, request: Any = None) -> tuple[Any, str]:
    """Run a wrapped unary behaviour that must abort; return (code, details)."""
    with pytest.raises(grpc.aio.AbortError):
        await behavior(request, ctx)
    assert ctx.aborted is not None
    return ctx.aborted


async def test_the_identity_is_bound_for_the_handler_and_unbound_after() -> None:
    seen: list[Identity] = []

    async def handler(request: Any, context: Any) -> str:
        seen.append(current_identity())
        return "answer"

    assert await unary(CHECK, handler)(None, FakeContext()) == "answer"
    assert seen == [OPERATOR]
    with pytest.raises(Unauthenticated):
        current_identity()


async def test_the_identity_is_unbound_even_when_the_handler_raises() -> None:
    async def handler(request: Any, context: Any) -> None:
        raise InvalidArgument("gate_id", "must be 1-64 printable characters")

    code, details = await call_refused(unary(CHECK, handler), FakeContext())
    assert (code, details) == (CODE.INVALID_ARGUMENT, "gate_id: must be 1-64 printable characters")
    with pytest.raises(Unauthenticated):
        current_identity()


async def test_an_error_that_is_not_a_broker_error_does_not_leak_its_message() -> None:
    async def handler(request: Any, context: Any) -> None:
        raise RuntimeError("sqlite path /var/secret; card C5001110000001")

    code, details = await call_refused(unary(CHECK, handler), FakeContext())
    assert code == CODE.INTERNAL
    assert details == "internal error"


async def test_a_method_the_callers_role_may_not_call_is_refused_before_the_handler() -> None:
    """A peer district's node calling the gate: PERMISSION_DENIED naming the method and caller."""
    ran: list[object] = []

    async def handler(request: Any, context: Any) -> None:
        ran.append(request)

    code, details = await call_refused(unary(CHECK, handler), FakeContext(pem=b"peer-node"))
    assert code == CODE.PERMISSION_DENIED
    assert "yikatong.v1.Gate/Check" in details and PEER_NODE.spiffe_id in details
    assert ran == []


async def test_a_method_no_rule_names_is_refused_to_everyone() -> None:
    async def handler(request: Any, context: Any) -> None:
        raise AssertionError("must not run")

    code, details = await call_refused(
        unary("/yikatong.v1.Admin/Wipe", handler), FakeContext(pem=b"operator")
    )
    assert code == CODE.PERMISSION_DENIED and "no access rule" in details


@pytest.mark.parametrize(
    ("ctx", "code"),
    [
        (FakeContext(pem=None), CODE.UNAUTHENTICATED),  # no client certificate at all
        (FakeContext(pem=b"\x00garbage"), CODE.PERMISSION_DENIED),  # the verifier refuses it
        (FakeContext(tls=b"TLSv1.2"), CODE.PERMISSION_DENIED),  # below the node's minimum
        (FakeContext(tls=b"SSLv3"), CODE.PERMISSION_DENIED),  # an unknown version
    ],
)
async def test_an_unusable_caller_is_refused_before_the_handler(
    ctx: FakeContext, code: grpc.StatusCode
) -> None:
    async def handler(request: Any, context: Any) -> None:
        raise AssertionError("must not run")

    got, _ = await call_refused(unary(CHECK, handler), ctx)
    assert got == code


async def test_an_abort_by_the_handler_itself_passes_through_unchanged() -> None:
    async def handler(request: Any, context: Any) -> None:
        await context.abort(CODE.NOT_FOUND, "no such thing")

    code, details = await call_refused(unary(CHECK, handler), FakeContext())
    assert (code, details) == (CODE.NOT_FOUND, "no such thing")


async def test_the_certificate_is_judged_at_the_guards_clock_and_the_nodes_minimum_tls() -> None:
    """The injected clock (not the wall clock) dates the check; min_tls "1.2" admits TLS 1.2."""
    verifier = FakeVerifier()
    when = datetime(2030, 1, 1, tzinfo=UTC)
    guard = AuthInterceptor(
        cast(CallerVerifier, verifier),
        AccessPolicy(DAZU, frozenset({ANYUE})),
        Metrics(),
        "1.2",
        lambda: when,
    )

    async def handler(request: Any, context: Any) -> str:
        return "ok"

    behavior = guard.wrap(CHECK, grpc.unary_unary_rpc_method_handler(handler)).unary_unary
    assert await behavior(None, FakeContext(tls=b"TLSv1.2")) == "ok"
    assert verifier.seen == [when]


async def test_every_call_is_timed_under_its_method_refused_or_not() -> None:
    metrics = Metrics()

    async def handler(request: Any, context: Any) -> str:
        return "ok"

    behavior = unary(CHECK, handler, metrics)
    await behavior(None, FakeContext())
    await call_refused(behavior, FakeContext(pem=None))
    assert len(metrics.recorder(CHECK)) == 2
    assert set(metrics.by_method) == {CHECK}


async def test_a_streaming_handler_sees_the_identity_and_its_errors_are_mapped() -> None:
    seen: list[Identity] = []

    async def stream(request: Any, context: Any) -> AsyncIterator[int]:
        seen.append(current_identity())
        yield 1
        seen.append(current_identity())
        raise Conflict("batch sequence 3 already used")

    handler = grpc.unary_stream_rpc_method_handler(stream)
    behavior = make_guard().wrap(RECOGNIZE, handler).unary_stream
    ctx = FakeContext(pem=b"peer-node")
    items: list[int] = []
    with pytest.raises(grpc.aio.AbortError):
        async for item in behavior(None, ctx):
            items.append(item)
    assert items == [1]
    assert seen == [PEER_NODE, PEER_NODE]
    assert ctx.aborted == (CODE.ALREADY_EXISTS, "batch sequence 3 already used")
    with pytest.raises(Unauthenticated):
        current_identity()


async def test_a_streaming_handler_of_a_refused_caller_yields_nothing() -> None:
    async def stream(request: Any, context: Any) -> AsyncIterator[int]:
        yield 1

    behavior = make_guard().wrap(RECOGNIZE, grpc.unary_stream_rpc_method_handler(stream))
    ctx = FakeContext(pem=b"operator")  # an operator may not call Recognition
    with pytest.raises(grpc.aio.AbortError):
        async for _ in behavior.unary_stream(None, ctx):
            raise AssertionError("an item reached a refused caller")
    assert ctx.aborted is not None and ctx.aborted[0] == CODE.PERMISSION_DENIED


async def test_a_stream_in_handler_is_guarded_and_hides_foreign_errors() -> None:
    seen: list[Identity] = []

    async def consume(requests: Any, context: Any) -> None:
        seen.append(current_identity())
        raise KeyError("internal detail")

    handler = grpc.stream_unary_rpc_method_handler(consume)
    behavior = make_guard().wrap(RECOGNIZE, handler).stream_unary
    ctx = FakeContext(pem=b"peer-node")
    code, details = await call_refused(behavior, ctx)
    assert (code, details) == (CODE.INTERNAL, "internal error")
    assert seen == [PEER_NODE]
    refused = FakeContext(pem=b"operator")
    code, _ = await call_refused(behavior, refused)
    assert code == CODE.PERMISSION_DENIED and seen == [PEER_NODE]


class RecordingServer:
    """Stands for grpc.aio.Server: keeps what is registered on it."""

    def __init__(self) -> None:
        self.generic: list[Any] = []
        self.registered: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        self.registered[service] = dict(handlers)


async def test_guarded_server_hands_the_real_server_only_wrapped_handlers() -> None:
    ran: list[object] = []

    class Gate(gate_pb2_grpc.GateServicer):
        async def Check(self, request: Any, context: Any) -> gate_pb2.GateDecision:
            ran.append(request)
            return gate_pb2.GateDecision(allow=True)

    server = RecordingServer()
    guarded = GuardedServer(cast(grpc.aio.Server, server), make_guard())
    gate_pb2_grpc.add_GateServicer_to_server(Gate(), guarded)
    guarded.check_complete()  # the generated code registered both ways: complete
    assert len(server.generic) == 1 and set(server.registered) == {"yikatong.v1.Gate"}
    registered = server.registered["yikatong.v1.Gate"]["Check"]
    assert registered.request_deserializer is None  # grpc hands the guard raw bytes
    check = registered.unary_unary
    request = gate_pb2.GateCheckRequest(operator_id=OPERATOR.operator_id, gate_id="g-1")
    code, _ = await call_refused(check, FakeContext(pem=b"peer-node"), b"\xff garbage")
    assert code == CODE.PERMISSION_DENIED and ran == []  # refused before any decoding
    assert (await check(request.SerializeToString(), FakeContext())).allow and ran == [request]


# --- Decoding after authorization, operator binding, refusals in the log -------------------


def generated_check(fn: Any) -> Any:
    """Gate.Check wrapped as a node registers it: the generated handler, deserializer and all."""
    server = RecordingServer()
    guarded = GuardedServer(cast(grpc.aio.Server, server), make_guard())

    class Gate(gate_pb2_grpc.GateServicer):
        async def Check(self, request: Any, context: Any) -> Any:
            return await fn(request, context)

    gate_pb2_grpc.add_GateServicer_to_server(Gate(), guarded)
    return server.registered["yikatong.v1.Gate"]["Check"].unary_unary


@pytest.mark.parametrize(
    "body",
    [
        b"\xff\xff\xff",
        b"\x0a\x05abc",
        gate_pb2.GateCheckRequest(gate_id="x").SerializeToString()[:-1],
    ],
)
async def test_a_body_that_does_not_decode_is_invalid_argument_naming_its_type(body: bytes) -> None:
    async def handler(request: Any, context: Any) -> None:
        raise AssertionError("must not run")

    code, details = await call_refused(generated_check(handler), FakeContext(), body)
    assert code == CODE.INVALID_ARGUMENT
    assert details == "request: does not decode as yikatong.v1.GateCheckRequest"


async def test_invalid_utf8_in_a_string_field_is_invalid_argument_too() -> None:
    async def handler(request: Any, context: Any) -> None:
        raise AssertionError("must not run")

    body = b"\x22\x02\xc3\x28"  # field 4 (gate_id), a string, holding invalid UTF-8
    code, details = await call_refused(generated_check(handler), FakeContext(), body)
    assert code == CODE.INVALID_ARGUMENT and "GateCheckRequest" in details


@pytest.mark.parametrize(
    ("operator_id", "code", "details"),
    [
        ("", CODE.INVALID_ARGUMENT, "operator_id: is required"),
        ("bus-99", CODE.PERMISSION_DENIED, "operator_id differs from the caller certificate's"),
    ],
)
async def test_the_guard_binds_a_requests_operator_id_to_the_callers(
    operator_id: str, code: grpc.StatusCode, details: str
) -> None:
    async def handler(request: Any, context: Any) -> None:
        raise AssertionError("must not run")

    body = gate_pb2.GateCheckRequest(operator_id=operator_id).SerializeToString()
    got, message = await call_refused(generated_check(handler), FakeContext(), body)
    assert got == code and message.startswith(details)


async def test_a_stream_message_that_does_not_decode_is_invalid_argument() -> None:
    from broker._proto.yikatong.v1 import settlement_pb2

    async def consume(requests: Any, context: Any) -> None:
        async for _ in requests:
            pass

    handler = grpc.stream_unary_rpc_method_handler(
        consume, request_deserializer=settlement_pb2.BatchPart.FromString
    )
    behavior = make_guard().wrap("/yikatong.v1.Settlement/ExchangeBatch", handler).stream_unary

    async def parts() -> AsyncIterator[bytes]:
        yield settlement_pb2.BatchPart(lines=b"x").SerializeToString()
        yield b"\xff\xff"

    code, details = await call_refused(behavior, FakeContext(pem=b"peer-node"), parts())
    assert (code, details) == (
        CODE.INVALID_ARGUMENT,
        "request: does not decode as yikatong.v1.BatchPart",
    )


async def test_storage_that_is_busy_is_unavailable_not_internal() -> None:
    import sqlite3

    async def handler(request: Any, context: Any) -> None:
        raise sqlite3.OperationalError("database is locked")

    code, details = await call_refused(unary(CHECK, handler), FakeContext())
    assert (code, details) == (CODE.UNAVAILABLE, "storage is unavailable; retry later")


def test_refusals_are_logged_once_then_counted_per_caller() -> None:
    import structlog.testing

    from broker.node.guard import RefusalLog

    now = [0.0]
    refusals = RefusalLog(period_s=60, clock=lambda: now[0])
    with structlog.testing.capture_logs() as logs:
        for _ in range(139):
            refusals.refused(CHECK, PEER_NODE.spiffe_id, CODE.PERMISSION_DENIED, "no")
        refusals.refused(CHECK, OPERATOR.spiffe_id, CODE.PERMISSION_DENIED, "no")
        now[0] = 61.0
        refusals.refused(CHECK, PEER_NODE.spiffe_id, CODE.PERMISSION_DENIED, "no")
    events = [(e["event"], e["caller"], e.get("count")) for e in logs]
    assert events == [
        ("call_refused", PEER_NODE.spiffe_id, None),
        ("call_refused", OPERATOR.spiffe_id, None),
        ("call_refused_repeated", PEER_NODE.spiffe_id, 139),
    ]


async def test_a_refusal_names_the_callers_spiffe_id_when_it_is_known() -> None:
    import structlog.testing

    async def handler(request: Any, context: Any) -> None:
        raise AssertionError("must not run")

    with structlog.testing.capture_logs() as logs:
        await call_refused(unary(CHECK, handler), FakeContext(pem=b"peer-node"))
    [refused] = [e for e in logs if e["event"] == "call_refused"]
    assert refused["caller"] == PEER_NODE.spiffe_id


# --- Through a running node ---------------------------------------------------------------


async def test_on_a_real_node_the_certificate_is_the_identity_and_roles_are_enforced(
    cluster: Cluster, now: datetime
) -> None:
    """An operator named only by a freshly issued certificate passes; the own node may not
    call Recognition (it is not a peer) and is told why."""
    address, dazu = cluster.nodes[DAZU].address, cluster.setups[DAZU]
    museum = operator_identity(DAZU, "museum-07")
    ch = caller_channel(address, dazu, certops.active_ca(dazu.paths), museum, now)
    own = node_channel(address, dazu, dazu)
    card = CardRef(DAZU, "NOSUCHCARD01")
    try:
        decision = await gate_stub(ch).Check(check_request(card, "museum-07"), timeout=5)
        assert not decision.allow  # answered: the handler saw museum-07 as the caller
        with pytest.raises(grpc.aio.AioRpcError) as other:
            await gate_stub(ch).Check(check_request(card, "transit-01"), timeout=5)
        assert other.value.code() == CODE.PERMISSION_DENIED  # cannot speak for another operator
        before = len(cluster.nodes[DAZU].metrics.recorder(RECOGNIZE))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await recognition_stub(own).Recognize(recognize_request(card), timeout=5)
        assert refused.value.code() == CODE.PERMISSION_DENIED
        assert "yikatong.v1.Recognition/Recognize" in (refused.value.details() or "")
        assert f"spiffe://{DAZU}.yikatong.cy/node" in (refused.value.details() or "")
        assert len(cluster.nodes[DAZU].metrics.recorder(RECOGNIZE)) == before + 1
    finally:
        await ch.close()
        await own.close()


def test_the_refusal_table_stays_bounded_whatever_callers_are_made_up() -> None:
    """Found by review: names come from unchecked certificates; a peer CA can mint any number."""
    import structlog.testing

    from broker.node.guard import MAX_TRACKED, RefusalLog

    refusals = RefusalLog(period_s=60, clock=lambda: 0.0)
    with structlog.testing.capture_logs():
        for i in range(MAX_TRACKED * 2 + 5):
            refusals.refused(CHECK, f"spiffe://x/{i}", CODE.PERMISSION_DENIED, "no")
    assert len(refusals._seen) <= MAX_TRACKED


async def test_a_server_stream_written_as_a_coroutine_is_tracked_while_it_runs() -> None:
    """Health.Watch is a coroutine that writes (grpc_health's aio servicer): it is a stream
    all the same, tracked so that a revoked caller's is ended at the next trust change."""
    guard = make_guard()
    running, release = asyncio.Event(), asyncio.Event()

    async def watch(request: Any, context: Any) -> None:
        running.set()
        await release.wait()

    handler = grpc.unary_stream_rpc_method_handler(watch, request_deserializer=None)
    behavior = guard.wrap("/grpc.health.v1.Health/Watch", handler).unary_stream
    task = asyncio.create_task(behavior(b"", FakeContext()))
    await asyncio.wait_for(running.wait(), 5)
    assert len(guard.streams) == 1
    release.set()
    await asyncio.wait_for(task, 5)
    assert len(guard.streams) == 0  # untracked when it ends


async def test_a_unary_call_is_not_tracked() -> None:
    guard = make_guard()
    seen: list[int] = []

    async def check(request: Any, context: Any) -> str:
        seen.append(len(guard.streams))
        return "answer"

    behavior = guard.wrap(CHECK, grpc.unary_unary_rpc_method_handler(check)).unary_unary
    assert await behavior(None, FakeContext()) == "answer"
    assert seen == [0]


# --- Methods whose bytes the guard passes through undecoded (SubmitTrips) -------------------

SUBMIT = "/yikatong.v1.Settlement/SubmitTrips"


def guard_with_undecoded(*methods: str) -> AuthInterceptor:
    return AuthInterceptor(
        cast(CallerVerifier, FakeVerifier()),
        AccessPolicy(DAZU, frozenset({ANYUE})),
        Metrics(),
        "1.3",
        lambda: datetime(2026, 11, 2, tzinfo=UTC),
        undecoded=frozenset(methods),
    )


async def test_an_undecoded_method_gets_the_raw_bytes_after_authorization() -> None:
    """SubmitTrips' body goes to the handler as bytes (its intake process decodes it); the
    caller is still identified and authorized first, and the answer may be bytes already."""
    seen: list[object] = []

    class Settlement(settlement_pb2_grpc.SettlementServicer):
        async def SubmitTrips(self, request: Any, context: Any) -> Any:
            seen.append(request)
            return b"\x0a\x00"  # serialized by the worker

    server = RecordingServer()
    guarded = GuardedServer(cast(grpc.aio.Server, server), guard_with_undecoded(SUBMIT))
    settlement_pb2_grpc.add_SettlementServicer_to_server(Settlement(), guarded)  # type: ignore[abstract]
    handler = server.registered["yikatong.v1.Settlement"]["SubmitTrips"]
    garbage = b"\xff not a request"
    assert await handler.unary_unary(garbage, FakeContext()) == b"\x0a\x00"
    assert seen == [garbage]  # undecoded: refusing a bad body is the handler's
    code, _ = await call_refused(handler.unary_unary, FakeContext(pem=b"peer-node"), garbage)
    assert code == CODE.PERMISSION_DENIED and len(seen) == 1  # a peer node may not submit
    encode = handler.response_serializer
    assert encode(b"raw") == b"raw"  # bytes pass through
    reply = settlement_pb2.SubmitTripsResponse(results=[settlement_pb2.TripResult(trip_id="t")])
    assert encode(reply) == reply.SerializeToString()  # messages are serialized as ever
    # a method the guard decodes is unchanged: its handler gets the message
    other = server.registered["yikatong.v1.Settlement"]["GetTripOutcomes"]
    assert other.request_deserializer is None


def test_a_method_whose_request_names_an_operator_cannot_go_undecoded() -> None:
    """The guard checks a request's operator_id against the caller's: it must decode it."""
    server = RecordingServer()
    guard = guard_with_undecoded("/yikatong.v1.Settlement/GetTripOutcomes")
    with pytest.raises(ConfigError, match="names an operator"):
        settlement_pb2_grpc.add_SettlementServicer_to_server(
            settlement_pb2_grpc.SettlementServicer(),  # type: ignore[abstract]
            GuardedServer(cast(grpc.aio.Server, server), guard),
        )
