"""Rotation on running districts: server, client and CA certificates, with zero failed calls."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc
from cryptography import x509

from broker._proto.yikatong.v1 import types_pb2
from broker.cards.model import Scene
from broker.gate.config import CacheConfig
from broker.node.server import Node
from broker.testbed import build as testbed
from broker.testbed.operator_client import GateClient, ReloadingChannel
from broker.trust import certops
from broker.trust.certops import RotationStage
from broker.trust.config import node_server_name
from broker.trust.identity import node_identity, operator_identity
from tests.conftest import ANYUE, DAZU


@dataclass
class Tally:
    calls: int = 0
    errors: list[str] = field(default_factory=list)
    sources: Counter[str] = field(default_factory=Counter)
    not_peer: list[str] = field(default_factory=list)  # why a neighbour's card was not PEER


def serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


async def fetched_by_peers(bundle_file: Path, *peers: str, within_s: float = 30) -> None:
    """Wait, as the runbook has operators wait (and ``rotate-ca --config`` checks), until every
    peer has fetched the bundle just published: a neighbour whose fetches were slow under
    load would otherwise not yet trust the CA being activated, and its calls would fail
    for the operator's haste, not the rotation's."""
    until = time.monotonic() + within_s
    while behind := certops.peers_behind(bundle_file, list(peers)):
        assert time.monotonic() < until, f"peers never fetched the bundle: {behind}"
        await asyncio.sleep(0.1)


async def test_rotating_server_client_and_ca_certificates_under_load_fails_no_call(tmp_path):
    now = datetime.now(UTC)
    # No answer cache: every check of a neighbour's card is a call to the neighbour.
    setups = testbed.build(
        tmp_path,
        (DAZU, ANYUE),
        now,
        cards_per_district=40,
        cache=CacheConfig(local_max_entries=0),
        reload_interval_ms=200,
        max_connection_age_s=2,
        bundle_refresh_s=1,
    )
    nodes = {c: await Node.start(s.config) for c, s in setups.items()}
    channels = {
        c: ReloadingChannel(
            nodes[c].address,
            node_server_name(c),
            s.paths.ca_cert,
            s.operator_cert,
            s.operator_key,
            check_every_s=0.2,
        )
        for c, s in setups.items()
    }
    clients = {c: GateClient(channels[c], s.operator_id) for c, s in setups.items()}
    cards = [card.ref for s in setups.values() for card in s.cards]
    tally = Tally()
    stop = asyncio.Event()

    async def worker(gate: str, seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            try:
                d = await clients[gate].check(rng.choice(cards), Scene.BUS)
            except grpc.aio.AioRpcError as exc:
                tally.errors.append(f"{gate}: {exc.code().name} {exc.details()}")
            else:
                source = types_pb2.DecisionSource.Name(d.source)
                tally.sources[source] += 1
                if source == "DECISION_SOURCE_OFFLINE_POLICY":
                    at = time.monotonic() - started
                    tally.not_peer.append(f"{gate} at {at:.1f}s: {d.reason}")
            tally.calls += 1

    started = time.monotonic()
    workers = [asyncio.create_task(worker(g, i)) for i, g in enumerate([DAZU, ANYUE] * 3)]
    dazu, anyue = setups[DAZU].paths, setups[ANYUE].paths
    before = {
        "dazu_node": serial(dazu.node_cert),
        "dazu_op": serial(setups[DAZU].operator_cert),
        "anyue_ca": certops.active_ca_id(anyue),
    }
    try:
        await asyncio.sleep(1.5)
        certops.issue_to_files(dazu, node_identity(DAZU), datetime.now(UTC))  # server cert
        await asyncio.sleep(2)
        certops.issue_to_files(
            dazu, operator_identity(DAZU, setups[DAZU].operator_id), datetime.now(UTC)
        )  # client cert
        await asyncio.sleep(2)
        certops.rotate_ca(anyue, RotationStage.PUBLISH, datetime.now(UTC))
        await asyncio.sleep(2)
        await fetched_by_peers(setups[ANYUE].config.trust.bundle_file or anyue.bundle, DAZU)
        certops.rotate_ca(anyue, RotationStage.ACTIVATE, datetime.now(UTC))
        await asyncio.sleep(2)
        await fetched_by_peers(setups[ANYUE].config.trust.bundle_file or anyue.bundle, DAZU)
        certops.rotate_ca(anyue, RotationStage.RETIRE, datetime.now(UTC))
        await asyncio.sleep(2)
    finally:
        stop.set()
        await asyncio.gather(*workers)
        elapsed = time.monotonic() - started
        for ch in channels.values():
            await ch.close()
        for node in nodes.values():
            await node.stop(grace=0.5)
    print(f"calls={tally.calls} sources={dict(tally.sources)} elapsed={elapsed:.1f}s")
    assert elapsed >= 10
    assert serial(dazu.node_cert) != before["dazu_node"]
    assert serial(setups[DAZU].operator_cert) != before["dazu_op"]
    assert certops.trusted_ca_ids(anyue) == [certops.active_ca_id(anyue)] != [before["anyue_ca"]]
    assert tally.errors == []
    assert tally.not_peer == []  # every peer call answered
    assert tally.sources["DECISION_SOURCE_PEER"] > 100 and tally.calls > 300
