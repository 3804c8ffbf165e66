"""Node epochs: the file that holds them, the names node certificates carry, a move.

Module under test: :mod:`broker.trust.epochs`; the move itself through
:mod:`broker.trust.certops` (``rotate --next-epoch``, ``publish-epoch``, ``revoke``).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
from cryptography import x509

from broker.trust import certops
from broker.trust.bundle import Bundle
from broker.trust.certops import CertOpsError, DistrictPaths
from broker.trust.certstore import dns_names
from broker.trust.config import NODE_NAME_RE
from broker.trust.crls import revoked_serials
from broker.trust.epochs import (
    NodeEpoch,
    epoch_names,
    parse_epoch,
    pinned_name,
    read_epoch,
    write_epoch,
)
from broker.trust.identity import node_identity, operator_identity

D = "500111"


@pytest.fixture
def paths(tmp_path: Path, now: datetime) -> DistrictPaths:
    p = DistrictPaths(tmp_path / "certs", D)
    certops.init_ca(p, now)
    certops.issue_to_files(p, node_identity(D), now)
    certops.issue_to_files(p, operator_identity(D, "bus-01"), now)
    return p


def node_cert(paths: DistrictPaths) -> x509.Certificate:
    return x509.load_pem_x509_certificate(paths.node_cert.read_bytes())


def bundle(paths: DistrictPaths) -> Bundle:
    signed = certops.read_bundle(paths.bundle)
    assert signed is not None
    return Bundle.parse(signed.document)


# ------------------------------------------------------------------ the file


def test_a_district_without_an_epoch_file_is_in_epoch_1_with_nothing_pending(tmp_path: Path):
    epoch = read_epoch(DistrictPaths(tmp_path, D))
    assert epoch == NodeEpoch(1, None) and not epoch.pending


@pytest.mark.parametrize("epoch", [NodeEpoch(1), NodeEpoch(1, 2), NodeEpoch(41, 42)])
def test_the_file_reads_back_what_was_written(tmp_path: Path, epoch: NodeEpoch):
    paths = DistrictPaths(tmp_path, D)
    write_epoch(paths, epoch)
    assert read_epoch(paths) == epoch


def test_the_file_is_two_key_value_lines():
    assert NodeEpoch(2, 3).render() == "current=2\nnext=3\n"
    assert parse_epoch("\ncurrent=7\n\n") == NodeEpoch(7)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "no current=N line"),
        ("next=2\n", "no current=N line"),
        ("current=0\n", "outside"),
        ("current=1\nnext=3\n", "must be 2"),
        ("current=1\ncurrent=2\n", "line 2"),
        ("current = one\n", "line 1"),
        ("current=²\n", "line 1"),
        ("epoch=1\n", "line 1"),
    ],
)
def test_a_malformed_file_is_refused_with_its_line(text: str, reason: str):
    with pytest.raises(CertOpsError, match=reason):
        parse_epoch(text, "node-epoch")


def test_a_move_records_the_next_epoch_once_and_completes_to_it():
    moving = NodeEpoch(3).begin_move()
    assert moving == NodeEpoch(3, 4) and moving.begin_move() == moving
    assert moving.complete_move() == NodeEpoch(4)
    with pytest.raises(CertOpsError, match="no node epoch move is pending"):
        NodeEpoch(4).complete_move()


def test_a_node_certificate_names_the_current_epoch_and_the_next_while_pending():
    assert epoch_names(D, NodeEpoch(1)) == (f"e1.node.{D}.yikatong.cy",)
    assert epoch_names(D, NodeEpoch(1, 2)) == (
        f"e1.node.{D}.yikatong.cy",
        f"e2.node.{D}.yikatong.cy",
    )
    assert pinned_name(D, NodeEpoch(1, 2)) == f"e1.node.{D}.yikatong.cy"
    assert all(NODE_NAME_RE.fullmatch(n) for n in epoch_names(D, NodeEpoch(999_998, 999_999)))


# ------------------------------------------------------------------ the store


def test_a_new_district_names_epoch_1_in_its_node_certificate_and_bundle(paths):
    assert dns_names(node_cert(paths)) == [f"node.{D}.yikatong.cy", f"e1.node.{D}.yikatong.cy"]
    assert bundle(paths).node_name == f"e1.node.{D}.yikatong.cy"
    op = x509.load_pem_x509_certificate(paths.operator_cert("bus-01").read_bytes())
    assert dns_names(op) == [f"bus-01.operator.{D}.yikatong.cy"]  # operators are not moved


def test_rotate_next_epoch_issues_a_certificate_naming_both_and_changes_no_bundle(paths, now):
    before = bundle(paths)
    done = certops.rotate(paths, node_identity(D), now, next_epoch=True)
    assert read_epoch(paths) == NodeEpoch(1, 2) == done.epoch
    assert dns_names(node_cert(paths)) == [
        f"node.{D}.yikatong.cy",
        f"e1.node.{D}.yikatong.cy",
        f"e2.node.{D}.yikatong.cy",
    ]
    assert bundle(paths) == before  # peers keep pinning e1 until publish-epoch
    assert not any("*" in n for n in dns_names(node_cert(paths)))


def test_a_renewal_during_a_move_keeps_both_names(paths, now):
    certops.rotate(paths, node_identity(D), now, next_epoch=True)
    certops.issue_to_files(paths, node_identity(D), now)  # what renew-due would do
    assert f"e2.node.{D}.yikatong.cy" in dns_names(node_cert(paths))


def test_publish_epoch_makes_the_next_epoch_current_in_a_new_bundle(paths, now):
    before = bundle(paths)
    certops.rotate(paths, node_identity(D), now, next_epoch=True)
    certops.publish_epoch(paths, now)
    after = bundle(paths)
    assert read_epoch(paths) == NodeEpoch(2)
    assert after.node_name == f"e2.node.{D}.yikatong.cy"
    assert after.sequence == before.sequence + 1
    # The next certificate drops the old name: a stolen one cannot follow.
    certops.issue_to_files(paths, node_identity(D), now)
    assert dns_names(node_cert(paths)) == [f"node.{D}.yikatong.cy", f"e2.node.{D}.yikatong.cy"]


def test_publish_epoch_without_a_pending_move_is_refused(paths, now):
    with pytest.raises(CertOpsError, match="no node epoch move is pending"):
        certops.publish_epoch(paths, now)
    assert read_epoch(paths) == NodeEpoch(1)


def test_publish_epoch_refuses_a_node_certificate_without_the_next_name(paths, now):
    """A move recorded, then an older certificate put back: peers would refuse the node."""
    old = paths.node_cert.read_bytes(), paths.node_key.read_bytes()
    certops.rotate(paths, node_identity(D), now, next_epoch=True)
    paths.node_cert.write_bytes(old[0])
    paths.node_key.write_bytes(old[1])
    with pytest.raises(CertOpsError, match=f"does not name e2.node.{D}"):
        certops.publish_epoch(paths, now)
    assert read_epoch(paths) == NodeEpoch(1, 2)


def test_the_old_node_serial_is_revoked_only_after_publish_epoch_unless_forced(paths, now):
    old = f"{node_cert(paths).serial_number:x}"
    certops.rotate(paths, node_identity(D), now, next_epoch=True)
    with pytest.raises(CertOpsError, match="publish-epoch` first"):
        certops.revoke(paths, old, now)
    assert revoked_serials(paths) == set()
    certops.publish_epoch(paths, now)
    done = certops.revoke(paths, old, now)
    assert (done.issuer, int(old, 16)) in revoked_serials(paths)


def test_force_revokes_a_node_serial_during_a_move(paths, now):
    old = f"{node_cert(paths).serial_number:x}"
    certops.rotate(paths, node_identity(D), now, next_epoch=True)
    certops.revoke(paths, old, now, force=True)
    assert int(old, 16) in {s for _, s in revoked_serials(paths)}


def test_next_epoch_is_for_the_node_and_revoke_old_for_operators(paths, now):
    with pytest.raises(CertOpsError, match="use it with --node"):
        certops.rotate(paths, operator_identity(D, "bus-01"), now, next_epoch=True)
    with pytest.raises(CertOpsError, match="once its new one is deployed"):
        certops.rotate(paths, node_identity(D), now, revoke_old=True)
    assert read_epoch(paths) == NodeEpoch(1)
