"""Mutual TLS seen by a client no one here wrote: ``openssl s_client``."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess

from broker.trust.config import node_server_name
from tests.conftest import DAZU, Cluster, unavailable

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
# The server's first HTTP/2 frame is SETTINGS: type 4, flags 0, stream 0.
SETTINGS_FRAME_TAIL = b"\x04\x00\x00\x00\x00\x00"


async def s_client(cluster: Cluster, *extra: str, wait_s: float = 10.0) -> tuple[bytes, bytes]:
    """Connect, send the HTTP/2 preface, keep reading until the server closes or ``wait_s``."""
    openssl = shutil.which("openssl")
    if openssl is None:
        unavailable("openssl is needed for the s_client tests")
        return b"", b""
    s = cluster.setups[DAZU]
    proc = await asyncio.create_subprocess_exec(
        openssl,
        "s_client",
        "-connect",
        cluster.nodes[DAZU].address,
        "-servername",
        node_server_name(DAZU),
        "-CAfile",
        str(s.paths.ca_cert),
        "-alpn",
        "h2",
        "-ign_eof",
        *extra,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    # s_client may already have exited (the server hung up): then its stdin is gone.
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        proc.stdin.write(H2_PREFACE)
        await proc.stdin.drain()
    out = bytearray()

    async def read_all() -> None:
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(4096):
            out.extend(chunk)

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(read_all(), wait_s)  # returns early when the server hangs up
    if proc.returncode is None:
        proc.kill()
    proc.stdin.close()
    err = await proc.stderr.read()
    await proc.wait()
    return bytes(out), err


async def test_without_a_client_certificate_the_server_hangs_up_before_any_data(cluster: Cluster):
    out, err = await s_client(cluster)
    assert b"TLSv1.3" in out  # the client's half of the handshake completed...
    assert SETTINGS_FRAME_TAIL not in out  # ...but not one byte of HTTP/2 came back
    assert b"eof" in err.lower() or b"alert" in err.lower()  # the server ended it


async def test_with_a_client_certificate_tls_1_3_is_negotiated_and_http2_spoken(cluster: Cluster):
    s = cluster.setups[DAZU]
    out, _ = await s_client(
        cluster, "-cert", str(s.operator_cert), "-key", str(s.operator_key), wait_s=3.0
    )
    assert b"New, TLSv1.3" in out
    assert SETTINGS_FRAME_TAIL in out  # the server answered the preface with SETTINGS
