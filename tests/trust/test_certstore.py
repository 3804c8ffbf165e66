"""The certificate store on disk: its paths, its reads, and the lock every change holds.

Module under test: :mod:`broker.trust.certstore` (the concurrency test drives it
through :mod:`broker.trust.certops`, as ``broker certs`` does, in separate processes).
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from broker.trust import certops
from broker.trust.bundle import Bundle, SignedBundle
from broker.trust.certops import CertOpsError, DistrictPaths, RotationStage
from broker.trust.certstore import (
    current_certificate,
    dns_names,
    identity_of,
    lifetime_days,
    store_lock,
)
from broker.trust.crls import read_crls
from broker.trust.identity import node_identity, operator_identity
from broker.trust.pki import crl_pem

D = "500111"


@pytest.fixture
def paths(tmp_path: Path, now: datetime) -> DistrictPaths:
    p = DistrictPaths(tmp_path / "certs", D)
    certops.init_ca(p, now)
    certops.issue_to_files(p, node_identity(D), now, days=30)
    return p


def test_store_lock_refuses_a_district_that_does_not_exist_and_creates_nothing(tmp_path: Path):
    """A typo in --district of a timer is an error, not a new empty district."""
    paths = DistrictPaths(tmp_path / "certs", "500153")
    with pytest.raises(CertOpsError, match="no CA for district 500153"), store_lock(paths):
        pass
    assert not (tmp_path / "certs").exists()


def test_store_lock_with_create_makes_the_district_directory_and_its_lock_file(tmp_path: Path):
    paths = DistrictPaths(tmp_path / "certs", D)
    with store_lock(paths, create=True), store_lock(paths):  # re-entrant
        assert paths.lock.exists()


def test_current_certificate_is_the_one_in_the_identitys_file(paths: DistrictPaths):
    cert = current_certificate(paths, node_identity(D))
    assert cert == x509.load_pem_x509_certificate(paths.node_cert.read_bytes())
    assert identity_of(cert) == node_identity(D)
    assert lifetime_days(cert) == 30
    assert f"node.{D}.yikatong.cy" in dns_names(cert)
    with pytest.raises(CertOpsError, match=r"no certificate for .*operator/bus-09"):
        current_certificate(paths, operator_identity(D, "bus-09"))


# ------------------------------------------------------------------ concurrent operations

ROUNDS = 25


@dataclass
class Seen:
    """What one worker process did: the bundles it published, the serials it revoked."""

    bundles: list[tuple[int, bytes]] = field(default_factory=list)
    revoked: list[tuple[int, str]] = field(default_factory=list)

    def add(self, signed: SignedBundle | None) -> None:
        if signed is not None:
            self.bundles.append((Bundle.parse(signed.document).sequence, signed.document))


def _wait(root: str, start_at: float) -> DistrictPaths:
    """The district's store, once every worker process is up."""
    time.sleep(max(0.0, start_at - time.time()))
    return DistrictPaths(Path(root), D)


def renewer(root: str, start_at: float) -> Seen:
    """The timer: every run re-signs every list and republishes (generous thresholds)."""
    paths, seen = _wait(root, start_at), Seen()
    for _ in range(ROUNDS):
        done = certops.renew_due(
            paths, datetime.now(UTC), crl_margin=timedelta(days=30), bundle_max_age=timedelta(0)
        )
        seen.add(done.bundle)
    return seen


def revoker(root: str, start_at: float) -> Seen:
    """An operator issuing certificates and revoking each one.

    It goes on until the rotator's last CA stage and a few rounds beyond, so
    that some revocations are by a CA still trusted at the end: checkable.
    """
    paths, seen = _wait(root, start_at), Seen()
    i = after = 0
    while (i < ROUNDS or after < 3) and i < ROUNDS * 8:  # bounded, should the rotator fail
        after += int(_rotated(root).exists())
        i += 1
        cert_path, _ = certops.issue_to_files(
            paths, operator_identity(D, f"rev-{i}"), datetime.now(UTC)
        )
        serial = x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number
        try:
            done = certops.revoke(paths, f"{serial:x}", datetime.now(UTC))
        except CertOpsError:  # its CA was retired in between: trusted nowhere anyway
            continue
        seen.revoked.append((serial, done.issuer))
        seen.add(done.bundle)
    return seen


def _rotated(root: str) -> Path:
    return Path(root) / "rotated"  # beside the district's directory, outside the store


def rotator(root: str, start_at: float) -> Seen:
    """An operator rotating the CA twice, starting a third, and republishing."""
    paths, seen = _wait(root, start_at), Seen()
    stages = [*RotationStage, *RotationStage, RotationStage.PUBLISH, RotationStage.ACTIVATE]
    for stage in stages:
        certops.rotate_ca(paths, stage, datetime.now(UTC))
    _rotated(root).touch()
    for _ in range(ROUNDS):
        seen.add(certops.publish_bundle(paths, datetime.now(UTC), max_age=timedelta(0)))
    return seen


def test_renew_due_revoke_and_rotate_ca_in_parallel_processes_lose_nothing(paths: DistrictPaths):
    """No revocation lost, no sequence published twice, sequences only grow."""
    start_at = time.time() + 1.5  # spawned interpreters start at different speeds
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(3, mp_context=ctx) as pool:
        futures = [pool.submit(w, str(paths.root), start_at) for w in (renewer, revoker, rotator)]
        results = [f.result(timeout=120) for f in futures]

    documents: dict[int, set[bytes]] = {}
    for seen in results:
        sequences = [s for s, _ in seen.bundles]
        assert sequences == sorted(sequences)  # within a process, never backwards
        for sequence, document in seen.bundles:
            documents.setdefault(sequence, set()).add(document)
    assert {s: len(d) for s, d in documents.items() if len(d) > 1} == {}  # one bundle each
    final = Bundle.parse(SignedBundle.from_json(paths.bundle.read_bytes()).document)
    assert final.sequence == max(documents) >= ROUNDS * 2

    crls = read_crls(paths)
    in_bundle = set(final.crls_pem)
    checked = 0
    for serial, issuer in results[1].revoked:
        if issuer not in crls:
            continue  # its CA was retired later
        assert crls[issuer].get_revoked_certificate_by_serial_number(serial) is not None
        checked += 1
    assert checked >= 3  # at least the rounds after the last CA stage
    assert {crl_pem(c).decode() for c in crls.values()} == in_bundle
