"""Revocation lists of a district's CAs: numbered upwards, re-signed before they lapse.

Module under test: :mod:`broker.trust.crls`.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from broker.trust import certops, crls
from broker.trust.certops import DistrictPaths, RotationStage
from broker.trust.identity import operator_identity
from broker.trust.pki import CRL_DAYS, crl_issuer_id, crl_number, crl_pem, load_crls

D = "500111"


@pytest.fixture
def paths(tmp_path: Path, now: datetime) -> DistrictPaths:
    p = DistrictPaths(tmp_path / "certs", D)
    certops.init_ca(p, now)
    return p


def only(paths: DistrictPaths) -> x509.CertificateRevocationList:
    (crl,) = crls.read_crls(paths).values()
    return crl


def issued_serial(paths: DistrictPaths, operator: str, now: datetime) -> int:
    cert_path, _ = certops.issue_to_files(paths, operator_identity(D, operator), now)
    return x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number


def test_a_new_ca_starts_with_an_empty_list_numbered_1(paths: DistrictPaths):
    crl = only(paths)
    assert len(crl) == 0 and crl_number(crl) == 1


def test_each_revocation_lists_the_serial_under_the_next_number(paths, now):
    issuer = certops.active_ca_id(paths)
    a, b = issued_serial(paths, "bus-01", now), issued_serial(paths, "bus-02", now)
    crls.add_revocation(paths, issuer, a, now)
    crls.add_revocation(paths, issuer, b, now)
    crls.add_revocation(paths, issuer, a, now)  # again: listed once, still a new number
    crl = only(paths)
    assert sorted(r.serial_number for r in crl) == sorted([a, b])
    assert crl_number(crl) == 4
    assert crls.revoked_serials(paths) == {(issuer, a), (issuer, b)}


def test_a_list_is_due_when_under_the_margin_is_left_or_it_has_lapsed(paths, now):
    crl = only(paths)
    assert not crls.due(crl, now, crls.RENEW_MARGIN)
    assert not crls.due(crl, now + timedelta(days=3), crls.RENEW_MARGIN)  # 4 days left
    assert crls.due(crl, now + timedelta(days=5), crls.RENEW_MARGIN)  # 2 days left
    assert crls.due(crl, now + timedelta(days=CRL_DAYS + 1), crls.RENEW_MARGIN)  # lapsed


def test_renew_lists_re_signs_a_due_list_with_the_same_entries_and_a_higher_number(paths, now):
    issuer = certops.active_ca_id(paths)
    serial = issued_serial(paths, "bus-01", now)
    crls.add_revocation(paths, issuer, serial, now)
    before = only(paths)
    later = now + timedelta(days=5)
    assert crls.renew_lists(paths, later) == [issuer]
    after = only(paths)
    assert crl_number(after) == crl_number(before) + 1
    assert [(r.serial_number, r.revocation_date_utc) for r in after] == [
        (r.serial_number, r.revocation_date_utc) for r in before
    ]  # the revocation keeps its date
    assert after.next_update_utc is not None and after.last_update_utc is not None
    assert before.last_update_utc is not None
    assert after.next_update_utc - later > timedelta(days=CRL_DAYS - 1)
    assert after.last_update_utc > before.last_update_utc
    assert after.is_signature_valid(certops.active_ca(paths).key.public_key())


def test_renew_lists_leaves_lists_with_time_left_untouched(paths, now):
    before = paths.crl.read_bytes()
    assert crls.renew_lists(paths, now + timedelta(days=3)) == []
    assert paths.crl.read_bytes() == before


def test_renew_lists_re_signs_each_ca_of_a_rotation_in_bundle_order(paths, now):
    certops.rotate_ca(paths, RotationStage.PUBLISH, now)
    ids = certops.trusted_ca_ids(paths)
    assert crls.renew_lists(paths, now + timedelta(days=6)) == ids
    numbers = {i: crl_number(c) for i, c in crls.read_crls(paths).items()}
    assert numbers == dict.fromkeys(ids, 2)


def test_write_crls_keeps_only_the_named_cas_in_order(paths, now):
    certops.rotate_ca(paths, RotationStage.PUBLISH, now)
    _first, second = certops.trusted_ca_ids(paths)
    lists = crls.read_crls(paths)
    crls.write_crls(paths, lists, [second])
    written = load_crls(paths.crl.read_bytes())
    assert [crl_issuer_id(c) for c in written] == [second]  # the file holds the named CA only
    kept = crls.lists_for(paths, [second], now)
    assert list(kept) == [second]
    assert crl_pem(kept[second]) == crl_pem(lists[second])  # kept, not rebuilt


def test_a_lost_crl_file_does_not_make_the_next_list_forget_or_reuse_a_number(
    tmp_path: Path, now: datetime
):
    """crl.pem deleted (an accident) after a revocation: the bundle still holds that list."""
    paths = DistrictPaths(tmp_path, "500111")
    certops.init_ca(paths, now)
    first, _ = certops.issue_to_files(paths, operator_identity("500111", "a"), now)
    second, _ = certops.issue_to_files(paths, operator_identity("500111", "b"), now)
    serial = {
        p: x509.load_pem_x509_certificate(p.read_bytes()).serial_number for p in (first, second)
    }
    certops.revoke(paths, f"{serial[first]:x}", now)
    [before] = crls.read_crls(paths).values()
    paths.crl.unlink()
    certops.revoke(paths, f"{serial[second]:x}", now)
    [after] = crls.read_crls(paths).values()
    assert crl_number(after) == crl_number(before) + 1
    assert {s for _, s in crls.revoked_serials(paths)} == {serial[first], serial[second]}


def test_renew_due_with_crl_pem_put_back_older_publishes_the_newest_lists(
    tmp_path: Path, now: datetime
):
    """Found by review: renew-due built the bundle from crl.pem alone and dropped a revocation."""
    paths = DistrictPaths(tmp_path, "500111")
    certops.init_ca(paths, now)
    cert, _ = certops.issue_to_files(paths, operator_identity("500111", "a"), now)
    serial = x509.load_pem_x509_certificate(cert.read_bytes()).serial_number
    older = paths.crl.read_bytes()
    certops.revoke(paths, f"{serial:x}", now)
    paths.crl.write_bytes(older)  # a backup put back
    certops.renew_due(paths, now + timedelta(days=2))  # the bundle is over a day old: republished
    held = certops.read_bundle(paths.bundle)
    assert held is not None
    from broker.trust.bundle import Bundle

    published = load_crls("".join(Bundle.parse(held.document).crls_pem).encode())
    assert [serial in {r.serial_number for r in c} for c in published] == [True]
    assert serial in {r.serial_number for c in load_crls(paths.crl.read_bytes()) for r in c}
