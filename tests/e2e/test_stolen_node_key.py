"""A stolen node key stops working within one bundle refresh; a withheld bundle trips the age limit.

gRPC Python's client cannot check the server's certificate against a revocation list,
so revoking a stolen node certificate alone would not stop it answering as its district.
The district moves its node to a new epoch instead (runbook: compromised node key); its
bundle pins the new name, and peers refuse a certificate without it. These tests put a
node with the stolen certificate on the district's address, before and after the move.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from broker.cards.model import Scene
from broker.gate.config import CacheConfig
from broker.node.server import Node
from broker.testbed import build as testbed
from broker.testbed.operator_client import GateClient
from broker.trust import certops
from broker.trust.config import node_epoch_name
from broker.trust.identity import node_identity
from broker.trust.store import peer_health_name
from tests.conftest import ANYUE, DAZU

pytestmark = pytest.mark.timeout(120)


def build(tmp_path: Path, now: datetime) -> dict[str, testbed.DistrictSetup]:
    return testbed.build(
        tmp_path,
        (DAZU, ANYUE),
        now,
        cards_per_district=20,
        bundle_refresh_s=1,
        cache=CacheConfig(local_max_entries=0),  # every check asks Anyue's node
        max_connection_age_s=1,
    )


async def eventually(check: Callable[[], Awaitable[bool]], what: str, within: float = 15) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.2)


async def test_a_stolen_node_certificate_is_refused_after_one_bundle_refresh(
    tmp_path: Path, now: datetime
):
    setups = build(tmp_path, now)
    dazu, anyue = setups[DAZU], setups[ANYUE]
    stolen = tmp_path / "stolen"
    stolen.mkdir()
    shutil.copy(anyue.paths.node_cert, stolen / "node.pem")
    shutil.copy(anyue.paths.node_key, stolen / "node.key")
    impostor_cfg = replace(
        anyue.config,
        tls=replace(anyue.config.tls, cert_file=stolen / "node.pem", key_file=stolen / "node.key"),
    )
    dazu_node = await Node.start(dazu.config)
    ch = dazu.operator_channel(dazu_node.address)
    gate = GateClient(ch, dazu.operator_id)
    card = next(c for c in anyue.cards if c.status == "active")

    async def allowed() -> bool:
        return (await gate.check(card.ref, Scene.BUS)).allow

    async def refused() -> bool:
        return not await allowed()

    e1, e2 = node_epoch_name(ANYUE, 1), node_epoch_name(ANYUE, 2)
    try:
        # Control: before the move the stolen certificate passes for Anyue's node.
        impostor = await Node.start(impostor_cfg)
        assert dazu_node.trust.current.node_name(ANYUE) == e1
        await eventually(allowed, "the stolen certificate was not even accepted before the move")
        await impostor.stop(grace=0.1)

        # The real node comes back; Anyue follows the runbook's procedure.
        real = await Node.start(anyue.config)
        old_serial = certops.current_certificate(anyue.paths, node_identity(ANYUE)).serial_number
        certops.rotate(anyue.paths, node_identity(ANYUE), now, next_epoch=True)  # e1 + e2
        real.request_reload()  # "deploy" (the files are where the node reads them)
        certops.publish_epoch(anyue.paths, now)  # the bundle names e2
        certops.revoke(anyue.paths, f"{old_serial:x}", now)

        async def pinned() -> bool:
            return dazu_node.trust.current.node_name(ANYUE) == e2

        await eventually(pinned, "Dazu did not pin Anyue's new epoch within a refresh")
        await eventually(allowed, "Dazu refused the real node's new certificate")
        await real.stop(grace=0.1)

        # The thief serves the old certificate on Anyue's address again: refused now.
        impostor = await Node.start(impostor_cfg)
        try:
            await eventually(refused, "the stolen certificate still answers as Anyue")
            for _ in range(5):
                assert await refused()
        finally:
            await impostor.stop(grace=0.1)
    finally:
        await ch.close()
        await dazu_node.stop(grace=0.1)


async def test_a_peer_bundle_past_the_age_limits_turns_unhealthy_then_untrusted(
    tmp_path: Path, now: datetime
):
    """Someone on the path withholds Anyue's newer bundles: Dazu's copy only grows older."""
    setups = build(tmp_path, now)
    dazu, anyue = setups[DAZU], setups[ANYUE]
    anyue_node = await Node.start(anyue.config)
    offset = timedelta()

    def clock() -> datetime:
        return datetime.now(now.tzinfo) + offset

    dazu_node = await Node.start(dazu.config, clock=clock)
    ch = dazu.operator_channel(dazu_node.address)
    gate = GateClient(ch, dazu.operator_id)
    card = next(c for c in anyue.cards if c.status == "active")
    name = peer_health_name(ANYUE)
    try:
        assert (await gate.check(card.ref, Scene.BUS)).allow
        assert dazu_node.trust.health()[name] is True
        offset = timedelta(seconds=dazu.config.trust.max_bundle_age_s + 3600)
        assert dazu_node.trust.health()[name] is False  # monitoring sees it ...
        assert (await gate.check(card.ref, Scene.BUS)).allow  # ... gates keep working
        offset = timedelta(seconds=dazu.config.trust.bundle_hard_age_s + 3600)

        async def untrusted() -> bool:
            return not dazu_node.trust.current.trusted(ANYUE)

        await eventually(untrusted, "a bundle past the hard limit was still trusted")
        decision = await gate.check(card.ref, Scene.BUS)
        assert not decision.allow
    finally:
        await ch.close()
        await dazu_node.stop(grace=0.1)
        await anyue_node.stop(grace=0.1)
