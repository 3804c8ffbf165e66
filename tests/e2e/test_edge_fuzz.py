"""Any input gets a clear answer: every RPC of every service, random fields and random bytes.

A district node runs on its own event loop in a background thread; a plain (sync) gRPC
client with mutual TLS sends each method raw bytes — garbage, truncated messages, and
messages with random field values — as an operator of the district and as a peer
district's node (each allowed on some methods, refused on the others). No answer may be
UNKNOWN or INTERNAL, and the node must still answer a good request afterwards. A second
test sends garbage from a separate client process, as a client this project did not write.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker._proto.yikatong.v1 import (
    admin_pb2,
    gate_pb2,
    recognition_pb2,
    settlement_pb2,
    trust_pb2,
)
from broker.cards.model import Scene
from broker.node.server import Node
from broker.testbed import build as testbed
from broker.testbed.build import DistrictSetup
from broker.trust import certops, pki
from broker.trust.config import node_server_name
from broker.trust.identity import admin_identity
from tests.conftest import ANYUE, DAZU

pytestmark = pytest.mark.timeout(240)

FILES = (
    gate_pb2,
    recognition_pb2,
    trust_pb2,
    settlement_pb2,
    admin_pb2,
    health_pb2,
    reflection_pb2,
)
NEVER = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)


@dataclass(frozen=True)
class Method:
    path: str
    request: pb_descriptor.Descriptor
    client_streaming: bool
    server_streaming: bool


METHODS = [
    Method(f"/{service.full_name}/{m.name}", m.input_type, m.client_streaming, m.server_streaming)
    for f in FILES
    for service in f.DESCRIPTOR.services_by_name.values()
    for m in service.methods
]


class Background:
    """Nodes on an event loop of their own, so that sync clients can call them."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        # Closed here, not left to the collector: an unclosed loop's ResourceWarning would
        # fail whichever later test happened to be running when it was collected.
        self.loop.close()


@dataclass
class Edge:
    setups: dict[str, DistrictSetup]
    address: str
    callers: dict[str, grpc.Channel]


def sync_channel(address: str, server: DistrictSetup, cert: Path, key: Path) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=server.paths.ca_cert.read_bytes(),
        private_key=key.read_bytes(),
        certificate_chain=cert.read_bytes(),
    )
    return grpc.secure_channel(
        address, creds, options=[("grpc.ssl_target_name_override", node_server_name(server.code))]
    )


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    root = tmp_path_factory.mktemp("edge")
    now = datetime.now(UTC)
    setups = testbed.build(root, (DAZU, ANYUE), now, cards_per_district=20)
    bg = Background()
    nodes = {code: bg.run(Node.start(s.config)) for code, s in setups.items()}
    dazu, anyue = setups[DAZU], setups[ANYUE]
    address = nodes[DAZU].address
    ops = pki.issue(certops.active_ca(dazu.paths), admin_identity(DAZU, "ops-1"), now, 1)
    (root / "admin.pem").write_bytes(ops.cert_pem())
    (root / "admin.key").write_bytes(ops.key_pem())
    callers = {
        "operator": sync_channel(address, dazu, dazu.operator_cert, dazu.operator_key),
        "peer-node": sync_channel(address, dazu, anyue.paths.node_cert, anyue.paths.node_key),
        "admin": sync_channel(address, dazu, root / "admin.pem", root / "admin.key"),
    }
    try:
        yield Edge(setups, address, callers)
    finally:
        for ch in callers.values():
            ch.close()
        for node in nodes.values():
            bg.run(node.stop(grace=0.1))
        bg.close()


def call(channel: grpc.Channel, method: Method, bodies: list[bytes]) -> grpc.StatusCode:
    """Send ``bodies`` (one, or each as a stream message) as raw bytes; the status answered."""
    identity: Callable[[bytes], bytes] = lambda b: b  # noqa: E731 - raw bytes both ways
    kwargs: dict[str, Any] = {"request_serializer": identity, "response_deserializer": identity}
    try:
        if method.client_streaming and method.server_streaming:
            for _ in channel.stream_stream(method.path, **kwargs)(iter(bodies), timeout=5):
                pass
        elif method.client_streaming:
            channel.stream_unary(method.path, **kwargs)(iter(bodies), timeout=5)
        elif method.server_streaming:
            stream = channel.unary_stream(method.path, **kwargs)(bodies[0], timeout=0.5)
            for _ in stream:  # Health.Watch answers once, then waits: stop after that
                stream.cancel()
                break
        else:
            channel.unary_unary(method.path, **kwargs)(bodies[0], timeout=5)
    except grpc.RpcError as exc:
        code = exc.code()
        assert isinstance(code, grpc.StatusCode)
        return code
    return grpc.StatusCode.OK


# ---------------------------------------------------------------- strategies

TEXT = st.one_of(
    st.text(max_size=80),
    st.sampled_from(["", "x" * 65, "110101199003077777", "\u0000", "bus-01", "2026-11-29", "*"]),
)
INTS = st.one_of(
    st.integers(-(2**31), 2**31 - 1),
    st.sampled_from([0, -1, 1, 2**31 - 1, -(2**31), 2_000_000_000]),
)
LONGS = st.one_of(
    INTS,
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([253_402_300_800, -62_135_596_801, 2**62]),  # outside Timestamp's range
)


@st.composite
def message_bytes(draw: st.DrawFn, descriptor: pb_descriptor.Descriptor, depth: int = 0) -> bytes:
    """A message of type ``descriptor`` with random values in some of its fields, serialized."""
    msg = message_factory.GetMessageClass(descriptor)()
    _fill(draw, msg, depth)
    return msg.SerializeToString()


def _fill(draw: st.DrawFn, msg: Any, depth: int) -> None:
    F = pb_descriptor.FieldDescriptor
    for field in msg.DESCRIPTOR.fields:
        if not draw(st.booleans()):
            continue
        repeated = field.is_repeated
        count = draw(st.integers(0, 3)) if repeated else 1
        for _ in range(count):
            if field.type == F.TYPE_MESSAGE:
                if depth >= 2:
                    break
                sub = getattr(msg, field.name).add() if repeated else getattr(msg, field.name)
                _fill(draw, sub, depth + 1)
                if not repeated:
                    sub.SetInParent()
                continue
            value = _scalar(draw, field)
            if repeated:
                getattr(msg, field.name).append(value)
            else:
                setattr(msg, field.name, value)


def _scalar(draw: st.DrawFn, field: pb_descriptor.FieldDescriptor) -> Any:
    F = pb_descriptor.FieldDescriptor
    if field.type == F.TYPE_STRING:
        return draw(TEXT)
    if field.type == F.TYPE_BYTES:
        return draw(st.binary(max_size=64))
    if field.type == F.TYPE_BOOL:
        return draw(st.booleans())
    if field.type == F.TYPE_ENUM:
        values = field.enum_type.values if field.enum_type is not None else []
        return draw(st.sampled_from([v.number for v in values] + [999]))
    if field.type in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return draw(LONGS)
    if field.type in (F.TYPE_UINT32, F.TYPE_FIXED32):
        return draw(st.integers(0, 2**32 - 1))
    if field.type in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return draw(st.integers(0, 2**64 - 1))
    if field.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return draw(st.floats(allow_nan=True, width=32))
    return draw(INTS)


def bodies_for(method: Method) -> st.SearchStrategy[list[bytes]]:
    one = st.one_of(
        message_bytes(method.request),
        st.binary(max_size=256),
        message_bytes(method.request).map(lambda b: b[: max(len(b) - 1, 0)]),  # truncated
    )
    return st.lists(one, min_size=1, max_size=4 if method.client_streaming else 1)


# ---------------------------------------------------------------- the tests


def test_every_method_of_every_service_is_fuzzed() -> None:
    """Guards the test below against a method list that lost services."""
    services = {m.path.split("/")[1] for m in METHODS}
    assert services == {
        "yikatong.v1.Gate",
        "yikatong.v1.Recognition",
        "yikatong.v1.Trust",
        "yikatong.v1.Settlement",
        "yikatong.v1.CardAdmin",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    # Gate 1, Recognition 2, Trust 1, Settlement 6, CardAdmin 1, Health 3, Reflection 1
    assert len(METHODS) == 15


@settings(
    derandomize=True,
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_no_input_gets_unknown_or_internal(edge: Edge, data: st.DataObject) -> None:
    method = data.draw(st.sampled_from(METHODS), label="method")
    caller = data.draw(st.sampled_from(sorted(edge.callers)), label="caller")
    bodies = data.draw(bodies_for(method), label="bodies")
    code = call(edge.callers[caller], method, bodies)
    assert code not in NEVER, (method.path, caller, code)


def test_the_node_still_answers_after_the_fuzzing(edge: Edge) -> None:
    anyue = edge.setups[ANYUE]
    dazu = edge.setups[DAZU]
    card = next(c for c in anyue.cards if c.status == "active")
    request = gate_pb2.GateCheckRequest(operator_id=dazu.operator_id, gate_id="g-1")
    request.scene = Scene.BUS.value  # type: ignore[assignment]
    request.card.issuer_region, request.card.card_number = (
        card.ref.issuer_region,
        card.ref.card_number,
    )
    stub = edge.callers["operator"].unary_unary(
        "/yikatong.v1.Gate/Check",
        request_serializer=gate_pb2.GateCheckRequest.SerializeToString,
        response_deserializer=gate_pb2.GateDecision.FromString,
    )
    assert stub(request, timeout=5).allow


GARBAGE_CLIENT = """
import json, sys, grpc
address, ca, cert, key, name = sys.argv[1:6]
methods = json.loads(sys.argv[6])
creds = grpc.ssl_channel_credentials(open(ca, "rb").read(), open(key, "rb").read(),
                                     open(cert, "rb").read())
ch = grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", name)])
out = {}
for path in methods:
    call = ch.unary_unary(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    codes = []
    bodies = (b"\\xff" * 7, b"\\x0a\\xff\\xff\\xff\\x0f", bytes(range(256)))
    for body in (*bodies, b"\\x12\\x02\\xc3\\x28"):
        try:
            call(body, timeout=5)
            codes.append("OK")
        except grpc.RpcError as exc:
            codes.append(exc.code().name)
    out[path] = codes
print(json.dumps(out))
"""


def test_garbage_from_a_separate_client_process_gets_clear_answers(edge: Edge) -> None:
    dazu = edge.setups[DAZU]
    unary = [m.path for m in METHODS if not m.client_streaming and not m.server_streaming]
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            GARBAGE_CLIENT,
            edge.address,
            str(dazu.paths.ca_cert),
            str(dazu.operator_cert),
            str(dazu.operator_key),
            node_server_name(DAZU),
            json.dumps(unary),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    answers: dict[str, list[str]] = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(answers) == set(unary)
    for path, codes in answers.items():
        assert not {"UNKNOWN", "INTERNAL"} & set(codes), (path, codes)
    # The operator may call the Gate: garbage there is a decoding error, named as such.
    assert answers["/yikatong.v1.Gate/Check"][0] == "INVALID_ARGUMENT"
    # It may not call Recognition: refused, whatever it sent.
    assert set(answers["/yikatong.v1.Recognition/Recognize"]) == {"PERMISSION_DENIED"}
