"""docs/operations.md, as written: two districts set up by its commands, then used."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from cryptography import x509

from broker.cards.gb11643 import ssn_check_character
from broker.cards.model import CardRef, Scene
from broker.testbed.build import free_port
from broker.testbed.operator_client import GateClient, open_channel
from broker.trust.config import node_server_name

DAZU, ANYUE = "500111", "512021"


def broker(*args: str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "broker", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    if ok:
        assert done.returncode == 0, f"broker {' '.join(args)}: {done.stdout}{done.stderr}"
    return done


def node_toml(code: str, peer: str, port: int, peer_port: int) -> str:
    return f"""district = "{code}"
listen = "127.0.0.1:{port}"
[tls]
ca_file = "certs/{code}/ca.pem"
cert_file = "certs/{code}/node.pem"
key_file = "certs/{code}/node.key"
crl_file = "certs/{code}/crl.pem"
[registry]
path = "var/{code}/registry.sqlite3"
[privacy]
hash_key_file = "certs/{code}/hash.key"
[trust]
bundle_file = "certs/{code}/bundle.json"
bundle_refresh_s = 1
[[peers]]
district = "{peer}"
address = "127.0.0.1:{peer_port}"
bundle_file = "var/{code}/peers/{peer}.bundle.json"
"""


def cards_csv(code: str) -> str:
    first = f"{code}19500101123"
    ssn = first + ssn_check_character(first)
    return (
        "card_number,ssn,status,disabled,student,valid_until\n"
        f"RB{code}0001,{ssn},active,false,false,2035-01-01\n"
    )


def test_the_runbooks_commands_set_up_two_districts_that_recognise_each_other(tmp_path: Path):
    ports = {DAZU: free_port(), ANYUE: free_port()}
    peer = {DAZU: ANYUE, ANYUE: DAZU}
    for code in (DAZU, ANYUE):
        broker("certs", "init-ca", "--district", code, "--dir", "certs", cwd=tmp_path)
        broker("certs", "issue", "--district", code, "--node", "--dir", "certs", cwd=tmp_path)
        broker(
            "certs",
            "issue",
            "--district",
            code,
            "--operator",
            "bus-01",
            "--dir",
            "certs",
            cwd=tmp_path,
        )
        broker(
            "trust",
            "export",
            "--district",
            code,
            "--dir",
            "certs",
            "--out",
            f"{code}.bundle.json",
            cwd=tmp_path,
        )
        (tmp_path / f"{code}.toml").write_text(
            node_toml(code, peer[code], ports[code], ports[peer[code]])
        )
    for code in (DAZU, ANYUE):
        first = broker(
            "trust",
            "import",
            f"{peer[code]}.bundle.json",
            "--config",
            f"{code}.toml",
            cwd=tmp_path,
            ok=False,
        )
        assert first.returncode == 1 and "fingerprint" in first.stderr.lower()
        broker(
            "trust",
            "import",
            f"{peer[code]}.bundle.json",
            "--config",
            f"{code}.toml",
            "--first-use",
            cwd=tmp_path,
        )
        (tmp_path / f"{code}.csv").write_text(cards_csv(code))
        broker("registry", "import", f"{code}.csv", "--config", f"{code}.toml", cwd=tmp_path)
        assert (
            broker("certs", "status", "--district", code, "--dir", "certs", cwd=tmp_path).returncode
            == 0
        )

    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "--config", f"{c}.toml"],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for c in (DAZU, ANYUE)
    ]
    try:
        asyncio.run(check_then_revoke(tmp_path, ports[DAZU]))
    finally:
        for proc in nodes:
            proc.send_signal(signal.SIGTERM)
        for proc in nodes:
            assert proc.wait(timeout=20) == 0


async def check_then_revoke(tmp_path: Path, port: int) -> None:
    """A Dazu bus checks an Anyue card (answered by Anyue); then the bus is revoked."""
    certs = tmp_path / "certs" / DAZU
    ch = open_channel(
        f"127.0.0.1:{port}",
        node_server_name(DAZU),
        certs / "ca.pem",
        certs / "operators" / "bus-01.pem",
        certs / "operators" / "bus-01.key",
    )
    gate = GateClient(ch, "bus-01")
    anyue_card = CardRef(ANYUE, f"RB{ANYUE}0001")
    try:
        deadline = time.monotonic() + 20
        while True:  # until both nodes are up
            try:
                d = await gate.check(anyue_card, Scene.SCENIC_AREA)
                if d.source == 3:  # PEER: Anyue answered over mutual TLS
                    break
            except grpc.aio.AioRpcError:
                pass
            assert time.monotonic() < deadline, "the two districts never recognised each other"
            await asyncio.sleep(0.2)
        assert d.allow and list(d.entitlements)  # born 1950: senior entitlements
        serial = x509.load_pem_x509_certificate(
            (certs / "operators" / "bus-01.pem").read_bytes()
        ).serial_number
        await asyncio.to_thread(
            broker,
            "certs",
            "revoke",
            "--district",
            DAZU,
            "--serial",
            f"{serial:x}",
            "--dir",
            "certs",
            cwd=tmp_path,
        )
        deadline = time.monotonic() + 5
        while True:
            try:
                await gate.check(anyue_card, Scene.BUS)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.PERMISSION_DENIED
                break
            assert time.monotonic() < deadline, "revocation did not take effect within 5 s"
            await asyncio.sleep(0.2)
    finally:
        await ch.close()
