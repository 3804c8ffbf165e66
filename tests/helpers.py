"""Small helpers for tests that talk to nodes as arbitrary callers."""

from __future__ import annotations

import asyncio
import contextlib
import io
import sqlite3
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker._proto.yikatong.v1 import (
    gate_pb2,
    gate_pb2_grpc,
    recognition_pb2,
    recognition_pb2_grpc,
    types_pb2,
)
from broker.cards.csv_import import parse_import
from broker.cards.gb11643 import ssn_check_character
from broker.cards.model import CardRef, shanghai_day
from broker.cards.privacy import load_key_file
from broker.cards.registry import Registry
from broker.cli.main import main
from broker.core.db import Db
from broker.node.config import NodeConfig
from broker.testbed.build import DistrictSetup
from broker.trust import pki
from broker.trust.config import node_server_name
from broker.trust.identity import Identity


def channel(
    address: str,
    district: str,
    ca_pem: bytes,
    cert_pem: bytes | None = None,
    key_pem: bytes | None = None,
) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )
    return grpc.aio.secure_channel(
        address,
        creds,
        options=[
            ("grpc.ssl_target_name_override", node_server_name(district)),
        ],
    )


def caller_channel(
    address: str,
    server: DistrictSetup,
    ca: pki.KeyPair,
    ident: Identity,
    now: datetime,
    days: int = 1,
) -> grpc.aio.Channel:
    """A channel presenting a certificate for ``ident`` freshly issued by ``ca``."""
    pair = pki.issue(ca, ident, now, days)
    return channel(
        address, server.code, server.paths.ca_cert.read_bytes(), pair.cert_pem(), pair.key_pem()
    )


def node_channel(address: str, server: DistrictSetup, me: DistrictSetup) -> grpc.aio.Channel:
    """A channel to ``server`` presenting ``me``'s node certificate."""
    return channel(
        address,
        server.code,
        server.paths.ca_cert.read_bytes(),
        me.paths.node_cert.read_bytes(),
        me.paths.node_key.read_bytes(),
    )


def check_request(
    ref: CardRef, operator_id: str, scene: Any = 1, gate_id: str = "g1"
) -> gate_pb2.GateCheckRequest:
    return gate_pb2.GateCheckRequest(
        card=types_pb2.CardRef(issuer_region=ref.issuer_region, card_number=ref.card_number),
        scene=scene,
        operator_id=operator_id,
        gate_id=gate_id,
    )


def recognize_request(ref: CardRef) -> recognition_pb2.RecognizeRequest:
    return recognition_pb2.RecognizeRequest(
        card=types_pb2.CardRef(issuer_region=ref.issuer_region, card_number=ref.card_number),
        scene=types_pb2.SCENE_BUS,
        request_id="t-1",
    )


def gate_stub(ch: grpc.aio.Channel) -> gate_pb2_grpc.GateStub:
    return gate_pb2_grpc.GateStub(ch)


def recognition_stub(ch: grpc.aio.Channel) -> recognition_pb2_grpc.RecognitionStub:
    return recognition_pb2_grpc.RecognitionStub(ch)


def import_lines(setup: DistrictSetup, lines: list[str], now: datetime) -> None:
    """Upsert card rows (CSV lines after the header) into a district's registry."""
    header = "card_number,ssn,status,disabled,student,valid_until"
    rows = parse_import([header, *lines], shanghai_day(now), load_key_file(setup.paths.hash_key))
    reg = Registry(setup.config.registry)
    try:
        reg.upsert(rows, now)
    finally:
        reg.close()


def ssn_for(area: str, born: str, seq: str = "555") -> str:
    """A well-formed ID number (GB 11643) for a region and birth date ``YYYYMMDD``."""
    first = f"{area}{born}{seq}"
    return first + ssn_check_character(first)


def run_cli(*args: str, clock: Callable[[], datetime] | None = None) -> str:
    """Run a ``broker`` command in-process, as operations staff would; return what it printed.

    ``clock`` is the commands' time (``broker settle`` reads it), when a test runs its own day.
    """
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main.main(
                ["--log-level", "warning", *args],
                standalone_mode=False,
                obj={"clock": clock} if clock else None,
            )
    except SystemExit as exc:
        if exc.code:
            raise RuntimeError(f"broker {' '.join(args)} failed: {err.getvalue()}") from exc
    return out.getvalue()


async def wait_healthy(address: str, server: DistrictSetup, me: DistrictSetup) -> None:
    """Until the node at ``address`` (``server``'s) answers its health SERVING to ``me``'s
    node certificate; fails after 20 s (a node started as a process of its own)."""
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        ch = node_channel(address, server, me)
        try:
            reply = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1
            )
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        finally:
            await ch.close()
        assert asyncio.get_running_loop().time() < deadline, f"{address} never became healthy"
        await asyncio.sleep(0.05)


def registry_file(cfg: NodeConfig) -> Path:
    """The SQLite file of a node's registry (the testbed's districts keep theirs in one)."""
    assert cfg.registry.path is not None, "this node's registry is on PostgreSQL"
    return cfg.registry.path


def refuse_rows(db: Db, table: str, column: str, value: str) -> type[Exception]:
    """Make the database refuse new rows of ``table`` whose ``column`` is ``value`` (a disk
    full, say); the error a write then raises."""
    if db.dialect == "sqlite":
        db.execute(
            f"CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} "
            f"WHEN NEW.{column} = '{value}' BEGIN SELECT RAISE(ABORT, 'disk full, say'); END"
        )
        return sqlite3.IntegrityError
    db.execute(  # NOT VALID: rows already there stay
        f"ALTER TABLE {table} ADD CONSTRAINT refuse_{table} CHECK ({column} <> '{value}') NOT VALID"
    )
    return psycopg.errors.CheckViolation
