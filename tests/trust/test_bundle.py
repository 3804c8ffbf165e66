"""Trust bundles: signed, sequenced, accepted only from a trusted CA with a higher sequence."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from broker.cli.main import main
from broker.peers.bundles import accept, held_bundle
from broker.trust import certops
from broker.trust.bundle import Bundle, BundleRefused, SignedBundle, sign, verify
from broker.trust.certops import DistrictPaths, RotationStage
from broker.trust.config import PeerConfig
from broker.trust.identity import operator_identity
from tests.conftest import ANYUE, DAZU, Cluster

D = "512021"


@pytest.fixture
def paths(tmp_path: Path, now: datetime) -> DistrictPaths:
    p = DistrictPaths(tmp_path / "solo-certs", D)
    certops.init_ca(p, now)
    certops.issue_to_files(p, operator_identity(D, "bus-01"), now)
    return p


def published(paths: DistrictPaths) -> SignedBundle:
    signed = certops.read_bundle(paths.bundle)
    assert signed is not None
    return signed


def peer(tmp_path: Path) -> PeerConfig:
    return PeerConfig(
        D,
        "127.0.0.1:1",
        None,
        "node.512021.yikatong.cy",
        bundle_file=tmp_path / "held" / f"{D}.bundle.json",
    )


def test_every_change_to_the_store_publishes_a_higher_sequence(paths, now):
    first = Bundle.parse(published(paths).document)
    certops.publish_bundle(paths, now)  # nothing changed: same bundle
    assert Bundle.parse(published(paths).document) == first
    serial = f"{certops.leaf_certificates(paths)[0][1].serial_number:x}"
    certops.revoke(paths, serial, now)
    second = Bundle.parse(published(paths).document)
    assert second.sequence == first.sequence + 1 and second.crls_pem != first.crls_pem
    assert second.settlement_keys == first.settlement_keys and len(first.settlement_keys) == 1


def test_a_forged_foreign_or_stale_bundle_is_refused(paths, now):
    signed = published(paths)
    cas = Bundle.parse(signed.document).cas()
    assert verify(signed, D, cas, 0).district == D
    tampered = SignedBundle(
        signed.document.replace(b'"sequence":1', b'"sequence":9'), signed.signer, signed.signature
    )
    with pytest.raises(BundleRefused, match="signature"):
        verify(tampered, D, cas, 0)
    with pytest.raises(BundleRefused, match="not 500111"):
        verify(signed, "500111", cas, 0)
    with pytest.raises(BundleRefused, match="not above"):
        verify(signed, D, cas, 1)
    other = DistrictPaths(paths.root, "500153")
    certops.init_ca(other, now)
    foreign_ca = certops.active_ca(other)
    forged = sign(replace(Bundle.parse(signed.document), sequence=5), foreign_ca)
    with pytest.raises(BundleRefused, match="not trusted"):
        verify(forged, D, cas, 1)


def test_a_ca_rotation_reaches_a_peer_through_bundles_signed_by_what_it_trusts(
    paths, now, tmp_path
):
    p = peer(tmp_path)
    with pytest.raises(BundleRefused, match="import the first one by hand"):
        accept(p, published(paths))
    assert accept(p, published(paths), first_use=True) is not None
    assert accept(p, published(paths)) is None  # the same one again: nothing to do
    for stage in RotationStage:
        certops.rotate_ca(paths, stage, now)
        certops.publish_bundle(paths, now)
        got = accept(p, published(paths))
        if stage is RotationStage.ACTIVATE:
            assert got is None  # content unchanged: same CAs, same lists
        else:
            assert got is not None
    held = held_bundle(p)
    assert held is not None and len(held.cas_pem) == 1
    assert held.cas()[0].subject == certops.active_ca(paths).cert.subject


def test_a_replayed_older_bundle_is_refused_and_the_held_one_kept(paths, now, tmp_path):
    p = peer(tmp_path)
    old = published(paths)
    accept(p, old, first_use=True)
    certops.rotate_ca(paths, RotationStage.PUBLISH, now)
    accept(p, published(paths))
    with pytest.raises(BundleRefused, match="not above"):
        accept(p, old)
    held = held_bundle(p)
    assert held is not None and len(held.cas_pem) == 2


def test_trust_export_and_import_commands(paths, tmp_path, districts, now):
    cfg_path = districts[DAZU].config_path  # Dazu's node; its peers are Anyue and Rongchang
    exported = tmp_path / "anyue.bundle.json"
    anyue = districts[ANYUE].paths
    result = CliRunner().invoke(
        main,
        ["trust", "export", "--district", ANYUE, "--dir", str(anyue.root), "--out", str(exported)],
    )
    assert result.exit_code == 0, result.output
    again = CliRunner().invoke(main, ["trust", "import", str(exported), "--config", str(cfg_path)])
    assert again.exit_code == 0 and "already held" in again.output
    # An impostor "Anyue" with a CA of its own is refused.
    CliRunner().invoke(
        main, ["trust", "export", "--district", D, "--dir", str(paths.root), "--out", str(exported)]
    )
    impostor = CliRunner().invoke(
        main, ["trust", "import", str(exported), "--config", str(cfg_path)]
    )
    assert impostor.exit_code == 1 and "reused with other content" in impostor.output
    # A bundle of a district that is not a peer is refused.
    yongchuan = DistrictPaths(paths.root, "500118")
    certops.init_ca(yongchuan, now)
    CliRunner().invoke(
        main,
        [
            "trust",
            "export",
            "--district",
            "500118",
            "--dir",
            str(paths.root),
            "--out",
            str(exported),
        ],
    )
    refused = CliRunner().invoke(
        main, ["trust", "import", str(exported), "--config", str(cfg_path)]
    )
    assert refused.exit_code == 1 and "not a peer" in refused.output


async def test_a_node_keeps_its_last_good_bundle_when_a_peer_serves_a_stale_one(
    cluster: Cluster, now
):
    anyue = cluster.setups[ANYUE].paths
    stale = anyue.bundle.read_bytes()
    certops.rotate_ca(anyue, RotationStage.PUBLISH, now)  # sequence 2, two CAs
    anyue_peer = cluster.setups[DAZU].config.peer(ANYUE)
    assert anyue_peer is not None and anyue_peer.bundle_file is not None
    held_file = anyue_peer.bundle_file
    for _ in range(50):  # fetched within the 1 s refresh interval
        if json.loads(json.loads(held_file.read_bytes())["document"])["sequence"] == 2:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the new bundle was not fetched")
    anyue.bundle.write_bytes(stale)  # the peer now serves sequence 1 again
    await asyncio.sleep(2.5)
    assert json.loads(json.loads(held_file.read_bytes())["document"])["sequence"] == 2
