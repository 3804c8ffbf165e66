"""What ``certs status`` reports: certificates held now and, with the log, replaced ones.

Module under test: :mod:`broker.trust.certstatus` (fed by certops, as the command is).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from broker.trust import certops
from broker.trust.certops import DistrictPaths, RotationStage
from broker.trust.certstatus import CertStatus, replaced_statuses, status
from broker.trust.identity import node_identity, operator_identity

D = "500111"
BUS = operator_identity(D, "bus-01")


@pytest.fixture
def paths(tmp_path: Path, now: datetime) -> DistrictPaths:
    p = DistrictPaths(tmp_path / "certs", D)
    certops.init_ca(p, now)
    certops.issue_to_files(p, node_identity(D), now)
    certops.issue_to_files(p, BUS, now, days=10)
    return p


def serial(path: Path) -> str:
    return f"{x509.load_pem_x509_certificate(path.read_bytes()).serial_number:x}"


def row(**kw: object) -> CertStatus:
    base: dict[str, object] = {
        "kind": "operator",
        "subject": BUS.spiffe_id,
        "serial": "1",
        "issuer": "ca",
        "not_after": "2030-01-01T00:00:00+00:00",
        "seconds_left": 86400,
        "fraction_left": 0.9,
        "revoked": False,
        "active": False,
    }
    return CertStatus(**{**base, **kw})  # type: ignore[arg-type]


def test_without_the_log_status_lists_cas_and_held_certificates(paths, now):
    rows = status(paths, now)
    assert [r.kind for r in rows] == ["ca", "node", "operator"]
    assert all(r.current and r.issuer_trusted and r.warning == "" for r in rows)


def test_replaced_certificates_come_from_the_log_with_their_state(paths, now):
    first = serial(paths.operator_cert("bus-01"))
    certops.rotate(paths, BUS, now)  # replaced, not revoked
    second = serial(paths.operator_cert("bus-01"))
    certops.rotate(paths, BUS, now, revoke_old=True)  # replaced and revoked
    third = serial(paths.operator_cert("bus-01"))
    rows = status(paths, now, certops.issued_entries(paths))
    by_serial = {r.serial: r for r in rows}
    assert [r.serial for r in rows if not r.current] == [first, second]  # oldest first
    assert by_serial[first].warning == "replaced, still valid until it expires"
    assert by_serial[second].revoked and by_serial[second].warning == "revoked"
    assert by_serial[third].current and by_serial[third].warning == ""
    assert by_serial[first].seconds_left > 0 and not by_serial[first].failing


def test_a_replaced_certificate_of_a_retired_ca_says_so(paths, now):
    old = serial(paths.operator_cert("bus-01"))
    for stage in RotationStage:
        certops.rotate_ca(paths, stage, now)
    (gone,) = [
        r for r in replaced_statuses(paths, certops.issued_entries(paths), now) if r.serial == old
    ]
    assert not gone.issuer_trusted and gone.warning == "replaced; its CA is retired"


def test_only_certificates_held_now_can_fail_status(paths, now):
    later = now + timedelta(days=9, hours=12)  # the 10-day operator certificate: 5% left
    certops.rotate(paths, BUS, now)
    rows = status(paths, later, certops.issued_entries(paths))
    held, replaced = (
        [r for r in rows if r.kind == "operator" and r.current],
        [r for r in rows if r.kind == "operator" and not r.current],
    )
    assert held[0].failing and held[0].warning.startswith("RENEW NOW")
    assert not replaced[0].failing
    assert not row(current=False, seconds_left=-1).failing
    assert row(current=False, seconds_left=-1).warning == "replaced, expired"


def test_as_dict_carries_every_field_and_the_warning():
    d = row(current=False).as_dict()
    assert d["current"] is False and d["issuer_trusted"] is True
    assert d["warning"] == "replaced, still valid until it expires"
