"""Certificate operations on disk: status, renewal, revocation lists, staged CA rotation.

Module under test: :mod:`broker.trust.certops` — what ``renew-due`` renews
(certificates, revocation lists, an aged bundle), ``rotate --revoke-old``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker.cli.main import main
from broker.trust import certops
from broker.trust.bundle import Bundle, sign
from broker.trust.certops import CertOpsError, DistrictPaths, RotationStage
from broker.trust.crls import read_crls, revoked_serials
from broker.trust.identity import node_identity, operator_identity
from broker.trust.pki import ca_id, crl_number, load_crls, write_public

NEVER = timedelta(days=3650)  # a bundle age threshold that does not trip

D = "500111"


@pytest.fixture
def paths(tmp_path: Path, now: datetime) -> DistrictPaths:
    p = DistrictPaths(tmp_path / "certs", D)
    certops.init_ca(p, now)
    certops.issue_to_files(p, node_identity(D), now, days=30)
    certops.issue_to_files(p, operator_identity(D, "bus-01"), now, days=30)
    return p


def cli(paths: DistrictPaths, *args: str):
    return CliRunner().invoke(main, ["certs", *args, "--district", D, "--dir", str(paths.root)])


def test_status_fails_past_two_thirds_of_a_lifetime_and_passes_after_renew_due(paths, now):
    assert cli(paths, "status").exit_code == 0
    # An operator certificate of 3 days issued 2.5 days ago: a sixth of its life left.
    certops.issue_to_files(paths, operator_identity(D, "bus-01"), now - timedelta(hours=60), 3)
    result = cli(paths, "status", "--json")
    assert result.exit_code == 1
    rows = {r["subject"]: r for r in json.loads(result.output)}
    op = rows[f"spiffe://{D}.yikatong.cy/operator/bus-01"]
    assert op["fraction_left"] < 1 / 3 and op["warning"].startswith("RENEW NOW")
    assert rows[f"spiffe://{D}.yikatong.cy/node"]["warning"] == ""
    renewed = cli(paths, "renew-due")
    assert renewed.exit_code == 0 and "1 certificate(s) renewed" in renewed.output
    assert cli(paths, "status").exit_code == 0
    new = x509.load_pem_x509_certificate(paths.operator_cert("bus-01").read_bytes())
    assert (new.not_valid_after_utc - new.not_valid_before_utc).days == 3  # lifetime kept


def test_expired_certificates_fail_status(paths, now):
    certops.issue_to_files(paths, node_identity(D), now - timedelta(days=5), 1)
    rows = certops.status(paths, now)
    node = next(r for r in rows if r.kind == "node")
    assert node.expired and node.failing and node.warning == "EXPIRED"


def test_revoke_lists_the_serial_in_its_issuers_crl(paths, now):
    cert = x509.load_pem_x509_certificate(paths.operator_cert("bus-01").read_bytes())
    serial = f"{cert.serial_number:x}"
    result = cli(paths, "revoke", "--serial", serial)
    assert result.exit_code == 0, result.output
    (crl,) = load_crls(paths.crl.read_bytes())
    ca = certops.active_ca(paths)
    assert crl.is_signature_valid(ca.key.public_key())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    assert [r.revoked for r in certops.status(paths, now) if r.kind == "operator"] == [True]
    assert cli(paths, "revoke", "--serial", "abc123").exit_code == 1  # never issued here


def test_ca_rotation_publishes_before_signing_and_retires_last(paths, now):
    first = certops.active_ca_id(paths)
    certops.rotate_ca(paths, RotationStage.PUBLISH, now)
    trusted = certops.trusted_ca_ids(paths)
    assert trusted[0] == first and len(trusted) == 2
    assert certops.active_ca_id(paths) == first  # published, not yet signing
    assert len(load_crls(paths.crl.read_bytes())) == 2
    with pytest.raises(CertOpsError, match="activate first"):
        certops.rotate_ca(paths, RotationStage.RETIRE, now)
    certops.issue_to_files(paths, operator_identity(D, "late-01"), now)  # by the old CA
    certops.rotate_ca(paths, RotationStage.ACTIVATE, now)
    second = certops.active_ca_id(paths)
    assert second == trusted[1]
    for _ident, cert in certops.leaf_certificates(paths):
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        assert (aki.key_identifier or b"").hex()[:16] == second
    certops.rotate_ca(paths, RotationStage.RETIRE, now)
    bundle = x509.load_pem_x509_certificates(paths.ca_cert.read_bytes())
    assert [ca_id(c) for c in bundle] == [second]
    assert not paths.ca_files(first)[1].exists()  # the old key is destroyed
    with pytest.raises(CertOpsError, match="nothing to retire"):
        certops.rotate_ca(paths, RotationStage.RETIRE, now)


def test_retire_refuses_while_a_certificate_of_the_old_ca_remains(paths, now):
    certops.rotate_ca(paths, RotationStage.PUBLISH, now)
    certops.rotate_ca(paths, RotationStage.ACTIVATE, now)
    old = certops.trusted_ca_ids(paths)[0]
    # Someone restores an operator certificate issued by the old CA.
    old_ca = certops.load_ca(paths, old)
    from broker.trust.pki import issue, save

    save(
        issue(old_ca, operator_identity(D, "stale-01"), now),
        paths.operator_cert("stale-01"),
        paths.operator_key("stale-01"),
    )
    with pytest.raises(CertOpsError, match="still issued by the old CA"):
        certops.rotate_ca(paths, RotationStage.RETIRE, now)


def held(paths: DistrictPaths) -> Bundle:
    signed = certops.read_bundle(paths.bundle)
    assert signed is not None
    return Bundle.parse(signed.document)


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


# ----------------------------------------------------------------- renew-due: revocation lists


def test_renew_due_re_signs_a_crl_lapsing_within_3_days_and_republishes_the_bundle(paths, now):
    """A revocation survives the re-signing: same entry, higher number, new validity."""
    revoked = serial_of(paths.operator_cert("bus-01"))
    certops.revoke(paths, f"{revoked:x}", now)
    (before,) = read_crls(paths).values()
    bundle_before = held(paths)
    later = now + timedelta(days=5)  # 2 days left of the 7
    done = certops.renew_due(paths, later, bundle_max_age=NEVER)
    assert done.crls == (certops.active_ca_id(paths),)
    (after,) = read_crls(paths).values()
    assert crl_number(after) == crl_number(before) + 1
    assert [r.serial_number for r in after] == [revoked]
    assert after.next_update_utc is not None and after.next_update_utc > later + timedelta(days=6)
    assert done.bundle is not None
    bundle = held(paths)
    assert bundle.sequence == bundle_before.sequence + 1
    assert bundle.crls_pem == (after.public_bytes(serialization.Encoding.PEM).decode(),)


def test_renew_due_leaves_a_crl_with_more_than_3_days_left(paths, now):
    crl_before, bundle_before = paths.crl.read_bytes(), paths.bundle.read_bytes()
    done = certops.renew_due(paths, now + timedelta(days=3), bundle_max_age=NEVER)
    assert done.crls == () and done.bundle is None
    assert paths.crl.read_bytes() == crl_before and paths.bundle.read_bytes() == bundle_before


def test_renew_due_of_a_district_without_a_ca_fails(tmp_path: Path, now):
    with pytest.raises(CertOpsError, match="no CA for district"):
        certops.renew_due(DistrictPaths(tmp_path / "certs", D), now)


# ----------------------------------------------------------------- renew-due: bundle age


def test_renew_due_republishes_a_bundle_older_than_24_h_with_the_same_content(paths, now):
    before = held(paths)
    assert certops.renew_due(paths, now + timedelta(hours=23)).bundle is None
    done = certops.renew_due(paths, now + timedelta(hours=25))
    assert done.bundle is not None and done.certificates == () and done.crls == ()
    after = held(paths)
    assert after.sequence == before.sequence + 1
    assert after.issued_at > before.issued_at and after.same_content(before)


def test_the_bundle_age_threshold_is_an_argument(paths, now):
    done = certops.renew_due(paths, now + timedelta(hours=2), bundle_max_age=timedelta(hours=1))
    assert done.bundle is not None and held(paths).sequence == 2


def test_renew_due_after_an_upgrade_republishes_a_bundle_without_a_node_name(paths, now):
    """Bundles of the previous release name no node: the next run names epoch 1."""
    old = replace(held(paths), node_name=None)
    write_public(paths.bundle, sign(old, certops.active_ca(paths)).to_json())
    assert certops.renew_due(paths, now).bundle is not None
    assert held(paths).node_name == f"e1.node.{D}.yikatong.cy"
    assert held(paths).sequence == old.sequence + 1


# ----------------------------------------------------------------- rotate


def test_rotate_revoke_old_retires_the_replaced_certificate_in_one_operation(paths, now):
    old = serial_of(paths.operator_cert("bus-01"))
    done = certops.rotate(paths, operator_identity(D, "bus-01"), now, revoke_old=True)
    new = serial_of(paths.operator_cert("bus-01"))
    issuer = certops.active_ca_id(paths)
    assert done.old_serial == f"{old:x}" and done.new_serial == f"{new:x}"
    assert done.revoked is not None and done.revoked.issuer == issuer
    assert revoked_serials(paths) == {(issuer, old)}
    assert held(paths).crls_pem == tuple(
        c.public_bytes(serialization.Encoding.PEM).decode()
        for c in load_crls(paths.crl.read_bytes())
    )


def test_rotate_without_revoke_old_leaves_the_replaced_certificate_valid(paths, now):
    done = certops.rotate(paths, operator_identity(D, "bus-01"), now)
    assert done.revoked is None and revoked_serials(paths) == set()
