"""``broker serve --log-json`` as a process: every line of its log stream is JSON.

The node is provoked into failed TLS handshakes (garbage over TCP, TLS without a
client certificate, a certificate from an unknown CA), each of which makes gRPC
core write a line of its own to fd 2 unless ``GRPC_VERBOSITY`` quiets it (see
``broker/node/logs.py``). The control test asks for core's lines and finds them,
so their absence in the first test means something.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker._proto.yikatong.v1 import recognition_pb2_grpc
from broker.testbed import build as testbed
from broker.testbed.build import DistrictSetup
from broker.trust import pki
from broker.trust.config import node_server_name
from broker.trust.identity import operator_identity
from tests.conftest import ANYUE, DAZU, unavailable
from tests.helpers import recognize_request

# gRPC core, when a handshake fails: "I1129 … ssl_transport_security.cc:…] Handshake failed …"
CORE_HANDSHAKE_LINE = b"Handshake failed"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def python_m_broker() -> list[str]:
    return [sys.executable, "-m", "broker"]


def console_script() -> list[str]:
    """The ``broker`` script pip wrote next to this interpreter ([project.scripts])."""
    script = Path(sys.executable).parent / "broker"
    if not script.exists():
        unavailable(f"no console script at {script}: is the package installed?")
    return [str(script)]


def secure_channel(s: DistrictSetup, cert: bytes | None, key: bytes | None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(s.paths.ca_cert.read_bytes(), key, cert)
    opts = [("grpc.ssl_target_name_override", node_server_name(s.code))]
    return grpc.secure_channel(s.config.listen, creds, options=opts)


def operator_channel(s: DistrictSetup) -> grpc.Channel:
    return secure_channel(s, s.operator_cert.read_bytes(), s.operator_key.read_bytes())


def health(s: DistrictSetup) -> Any:
    with operator_channel(s) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)


def wait_until_healthy(s: DistrictSetup, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            health(s)
            return
        except grpc.RpcError:
            assert proc.poll() is None, "node exited before it became healthy"
            assert time.monotonic() < deadline, "node never became healthy"
            time.sleep(0.1)


def garbage_over_tcp(address: str) -> None:
    """Plain HTTP to the TLS port; returns once the node has hung up."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: yikatong\r\n\r\n")
        with contextlib.suppress(OSError):
            while sock.recv(4096):
                pass


def tls_without_client_certificate(s: DistrictSetup) -> None:
    """A TLS client that trusts the node but shows no certificate; the node refuses it."""
    ctx = ssl.create_default_context(cafile=str(s.paths.ca_cert))
    ctx.set_alpn_protocols(["h2"])
    host, port = s.config.listen.rsplit(":", 1)
    refused = False
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=node_server_name(s.code)) as tls:
                tls.sendall(H2_PREFACE)
                refused = tls.recv(4096) == b""  # TLS 1.3: the refusal follows the handshake
        except (ssl.SSLError, ConnectionError):
            refused = True
    assert refused


def certificate_from_an_unknown_ca(s: DistrictSetup, now: datetime) -> None:
    rogue = pki.create_ca(s.code, now)  # names the district, but nobody trusts it
    pair = pki.issue(rogue, operator_identity(s.code, s.operator_id), now, 1)
    with secure_channel(s, pair.cert_pem(), pair.key_pem()) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def recognize_as_peer(s: DistrictSetup, peer: DistrictSetup) -> None:
    """A call the node logs at debug level (``recognized``)."""
    creds = (peer.paths.node_cert.read_bytes(), peer.paths.node_key.read_bytes())
    with secure_channel(s, *creds) as ch:
        stub = recognition_pb2_grpc.RecognitionStub(ch)
        stub.Recognize(recognize_request(s.cards[0].ref), timeout=5)


def serve_and_provoke(
    tmp_path: Path,
    now: datetime,
    command: Sequence[str],
    options: Sequence[str],
    env: Mapping[str, str] = {},
) -> tuple[DistrictSetup, bytes]:
    """Run ``<command> serve --config … <options>``, fail three handshakes, stop it.

    Returns the district served and what its node wrote to stderr; it must have
    written nothing to stdout.
    """
    setups = testbed.build(tmp_path, (DAZU, ANYUE), now, cards_per_district=5)
    s = setups[DAZU]
    # The node's own default is under test: none inherited from this process.
    environ = {k: v for k, v in os.environ.items() if k not in ("GRPC_VERBOSITY", "GRPC_TRACE")}
    proc = subprocess.Popen(
        [*command, "serve", "--config", str(s.config_path), *options],
        env={**environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until_healthy(s, proc)
        garbage_over_tcp(s.config.listen)
        tls_without_client_certificate(s)
        certificate_from_an_unknown_ca(s, now)
        recognize_as_peer(s, setups[ANYUE])
        assert health(s).status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err.decode(errors="replace")
    assert out == b""  # logs stay on stderr: stdout is for commands' output
    return s, err


@pytest.mark.parametrize("entry", [python_m_broker, console_script], ids=["python-m", "script"])
def test_serve_log_json_writes_only_json_lines_when_handshakes_fail(
    tmp_path: Path, now: datetime, entry: Any
):
    """Both entries of the command keep gRPC core's lines off the stream, and the options
    work after the subcommand: ``serve --log-json --log-level debug``."""
    s, err = serve_and_provoke(tmp_path, now, entry(), ["--log-json", "--log-level", "debug"])
    assert CORE_HANDSHAKE_LINE not in err and b"ssl_transport_security" not in err
    events = []
    for line in err.decode().splitlines():
        event = json.loads(line)  # every line, none skipped
        assert isinstance(event, dict) and {"event", "level", "timestamp"} <= event.keys(), line
        events.append(event)
    names = [e["event"] for e in events]
    assert names.index("node_started") < names.index("node_serving") < names.index("node_stopped")
    (serving,) = (e for e in events if e["event"] == "node_serving")
    assert (serving["district"], serving["address"]) == (DAZU, s.config.listen)
    assert {"level": "debug", "event": "recognized"}.items() <= next(
        e for e in events if e["event"] == "recognized"
    ).items()


def test_grpc_core_lines_are_back_when_the_operator_asks_for_them(tmp_path: Path, now: datetime):
    """The control: the same handshakes with ``GRPC_VERBOSITY=INFO`` set by the operator.

    Core's lines appear (one per failed handshake): the provocations above do make
    core write, and an explicit setting is kept. Everything else is still JSON.
    """
    _, err = serve_and_provoke(
        tmp_path, now, python_m_broker(), ["--log-json"], env={"GRPC_VERBOSITY": "INFO"}
    )
    core = [line for line in err.splitlines() if not line.startswith(b"{")]
    assert sum(CORE_HANDSHAKE_LINE in line for line in core) >= 3, err.decode()
    for line in err.splitlines():
        if line.startswith(b"{"):
            json.loads(line)
