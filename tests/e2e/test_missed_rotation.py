"""A neighbour that missed a CA rotation's publish stage: refused up front, recoverable by hand.

Reproduces what a test from outside found: Anyue rotated its CA while Dazu (fetching
bundles rarely) had not yet seen the publish-stage bundle. From then on Dazu refused
every Anyue card, and could not fetch the newer bundle over the channel it could no
longer set up. Now ``rotate-ca --stage activate`` refuses while a peer is behind;
forced anyway, Dazu recovers with the documented ``trust import --first-use --replace``.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import pytest

from broker.cards.model import Scene
from broker.gate.config import CacheConfig
from broker.node.server import Node
from broker.testbed import build as testbed
from broker.testbed.operator_client import GateClient
from tests.conftest import ANYUE, DAZU
from tests.helpers import run_cli

pytestmark = pytest.mark.timeout(120)


async def recognised(gate: GateClient, setup: testbed.DistrictSetup) -> bool:
    card = next(c for c in setup.cards if c.status == "active")
    return (await gate.check(card.ref, Scene.BUS)).allow


async def test_activate_refuses_while_a_peer_is_behind_and_a_forced_one_is_recovered(
    tmp_path: Path, now: datetime
):
    # Bundles fetched once at start, then hourly: Dazu will miss Anyue's publish stage.
    setups = testbed.build(
        tmp_path,
        (DAZU, ANYUE),
        now,
        cards_per_district=20,
        bundle_refresh_s=3600,
        cache=CacheConfig(local_max_entries=0),  # every check asks Anyue's node
        max_connection_age_s=1,  # an open connection does not outlive the rotation
    )
    dazu, anyue = setups[DAZU], setups[ANYUE]
    # Anyue first: Dazu fetches its bundle at start, then only hourly.
    nodes = {c: await Node.start(setups[c].config) for c in (ANYUE, DAZU)}
    ch = dazu.operator_channel(nodes[DAZU].address)
    gate = GateClient(ch, dazu.operator_id)
    anyue_certs = ("--district", ANYUE, "--dir", str(anyue.paths.root))
    try:
        deadline = time.monotonic() + 10
        while "fetched our 1 at" not in run_cli(
            "trust", "status", "--config", str(anyue.config_path)
        ):
            assert time.monotonic() < deadline, "Dazu never fetched Anyue's first bundle"
            await asyncio_sleep(0.2)
        assert await recognised(gate, anyue)

        run_cli("certs", "rotate-ca", *anyue_certs, "--stage", "publish")
        status = run_cli("trust", "status", "--config", str(anyue.config_path))
        assert f"{DAZU}:" in status and "(BEHIND)" in status
        with pytest.raises(RuntimeError, match=rf"not every peer has fetched bundle .*{DAZU}"):
            run_cli(
                "certs",
                "rotate-ca",
                *anyue_certs,
                "--stage",
                "activate",
                "--config",
                str(anyue.config_path),
            )
        with pytest.raises(RuntimeError, match="pass --config"):
            run_cli("certs", "rotate-ca", *anyue_certs, "--stage", "activate")

        # Forced: Anyue's node now presents a certificate of a CA Dazu never saw.
        run_cli("certs", "rotate-ca", *anyue_certs, "--stage", "activate", "--force")
        nodes[ANYUE].request_reload()
        deadline = time.monotonic() + 15
        while await recognised(gate, anyue):
            assert time.monotonic() < deadline, "Dazu kept trusting Anyue's old certificate"
            await asyncio_sleep(0.2)

        # Anyue finishes its rotation meanwhile: the old CA, the one Dazu holds, is gone.
        run_cli("certs", "rotate-ca", *anyue_certs, "--stage", "retire", "--force")
        # A plain import of Anyue's current bundle is refused; the documented one works.
        exported = tmp_path / "anyue.bundle.json"
        run_cli("trust", "export", *anyue_certs, "--out", str(exported))
        for flags in ((), ("--first-use",)):
            with pytest.raises(RuntimeError, match=r"not trusted|does not bypass|held"):
                run_cli("trust", "import", str(exported), "--config", str(dazu.config_path), *flags)
        run_cli(
            "trust",
            "import",
            str(exported),
            "--config",
            str(dazu.config_path),
            "--first-use",
            "--replace",
        )
        deadline = time.monotonic() + 15
        while not await recognised(gate, anyue):
            assert time.monotonic() < deadline, "Dazu did not recover after the re-import"
            await asyncio_sleep(0.2)
    finally:
        await ch.close()
        for node in nodes.values():
            await node.stop(grace=0.2)


async def asyncio_sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)
