"""broker/cli/certs.py: the ``broker certs`` commands as operations staff run them.

tests/cli/test_main.py covers key modes, SPIFFE identities, init-ca twice, issue with
both kinds and a bad operator id; tests/trust/test_certops.py covers status --json after
ageing, renew-due and revoke of a known serial. These add what the CLI itself decides:
which flag combinations and values it refuses, rotate, rotate-ca's stages, status's
table form and exit code, and how it treats a district it has no CA for.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509

from broker.cli.main import main
from broker.trust import certops
from broker.trust.bundle import verify
from broker.trust.certops import DistrictPaths
from broker.trust.identity import node_identity, operator_identity
from broker.trust.pki import ca_id
from broker.trust.tls import spiffe_ids

D = "500111"


def certs(root: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["certs", *args, "--dir", str(root)])


def flat(text: str) -> str:
    """The output with Rich's line wrapping undone."""
    return " ".join(text.split())


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A certs directory where district D has a CA, a node and one operator (bus-01, 7 days)."""
    r = tmp_path / "certs"
    for args in (
        ("init-ca", "--district", D),
        ("issue", "--district", D, "--node"),
        ("issue", "--district", D, "--operator", "bus-01", "--days", "7"),
    ):
        result = certs(r, *args)
        assert result.exit_code == 0, result.output
    return r


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_init_ca_publishes_a_bundle_that_verifies_against_its_own_ca(tmp_path: Path):
    r = tmp_path / "certs"
    result = certs(r, "init-ca", "--district", D)
    assert result.exit_code == 0, result.output
    paths = DistrictPaths(r, D)
    (ca,) = x509.load_pem_x509_certificates(paths.ca_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    signed = certops.read_bundle(paths.bundle)
    assert signed is not None
    bundle = verify(signed, D, None, 0)  # what a neighbour's first import checks
    assert [ca_id(c) for c in bundle.cas()] == [ca_id(ca)]
    assert str(paths.ca_cert) in flat(result.output)


def test_init_ca_keeps_an_existing_hash_key(tmp_path: Path):
    """A hash key restored before the CA keys every registry hash: it must not be replaced."""
    r = tmp_path / "certs"
    paths = DistrictPaths(r, D)
    paths.dir.mkdir(parents=True)
    paths.hash_key.write_bytes(b"k" * 32)
    assert certs(r, "init-ca", "--district", D).exit_code == 0
    assert paths.hash_key.read_bytes() == b"k" * 32


@pytest.mark.parametrize("bad", ["12345", "5001110", "abcdef", "000000", "../500111"])
def test_a_malformed_district_code_is_refused(tmp_path: Path, bad: str):
    r = tmp_path / "certs"
    result = certs(r, "init-ca", "--district", bad)
    assert result.exit_code != 0
    assert not any(tmp_path.rglob("*.pem"))  # nothing written, inside the dir or beside it


def test_issue_needs_one_of_node_or_operator(root: Path):
    """Neither flag is refused like both are (test_main covers both)."""
    result = certs(root, "issue", "--district", D)
    assert result.exit_code == 1
    assert "error: give exactly one of --node or --operator ID" in flat(result.output)


def test_issue_before_init_ca_fails_clearly_and_writes_no_certificate(tmp_path: Path):
    r = tmp_path / "certs"
    result = certs(r, "issue", "--district", D, "--node")
    assert result.exit_code == 1
    assert f"no CA for district {D}" in flat(result.output)
    assert not DistrictPaths(r, D).node_cert.exists()


@pytest.mark.parametrize("days", ["0", "399", "-1", "seven"])
def test_issue_refuses_lifetimes_outside_1_to_398_days(root: Path, days: str):
    """398 days is the most a TLS certificate may live; 0 or less is no certificate."""
    before = DistrictPaths(root, D).node_cert.read_bytes()
    result = certs(root, "issue", "--district", D, "--node", "--days", days)
    assert result.exit_code == 2
    assert "--days" in result.output
    assert DistrictPaths(root, D).node_cert.read_bytes() == before


@pytest.mark.parametrize("days", ["1", "398"])
def test_issue_accepts_the_lifetime_boundaries(root: Path, days: str):
    result = certs(root, "issue", "--district", D, "--operator", "edge-01", "--days", days)
    assert result.exit_code == 0, result.output
    cert = load(DistrictPaths(root, D).operator_cert("edge-01"))
    assert certops.lifetime_days(cert) == int(days)


def test_rotate_replaces_key_and_certificate_keeping_identity_and_lifetime(root: Path):
    paths = DistrictPaths(root, D)
    old_cert = load(paths.operator_cert("bus-01"))
    old_key = paths.operator_key("bus-01").read_bytes()
    result = certs(root, "rotate", "--district", D, "--operator", "bus-01")
    assert result.exit_code == 0, result.output
    new_cert = load(paths.operator_cert("bus-01"))
    assert new_cert.serial_number != old_cert.serial_number
    assert paths.operator_key("bus-01").read_bytes() != old_key
    assert (
        spiffe_ids(new_cert) == spiffe_ids(old_cert) == [operator_identity(D, "bus-01").spiffe_id]
    )
    assert certops.lifetime_days(new_cert) == 7  # issued with --days 7, not the default
    assert "rotated" in result.output


def test_rotate_node_keeps_its_identity(root: Path):
    paths = DistrictPaths(root, D)
    old = load(paths.node_cert)
    assert certs(root, "rotate", "--district", D, "--node").exit_code == 0
    new = load(paths.node_cert)
    assert new.serial_number != old.serial_number
    assert spiffe_ids(new) == [node_identity(D).spiffe_id]


def test_rotate_of_a_missing_identity_fails_clearly_and_issues_nothing(root: Path):
    result = certs(root, "rotate", "--district", D, "--operator", "ghost-01")
    assert result.exit_code == 1
    out = flat(result.output)
    assert f"no certificate for spiffe://{D}.yikatong.cy/operator/ghost-01 to rotate" in out
    assert "issue one first" in out
    assert not DistrictPaths(root, D).operator_cert("ghost-01").exists()


def test_rotate_of_a_district_without_anything_fails(tmp_path: Path):
    result = certs(tmp_path / "certs", "rotate", "--district", D, "--node")
    assert result.exit_code == 1
    assert "no certificate for" in flat(result.output)


@pytest.mark.parametrize("flags", [(), ("--node", "--operator", "bus-01")])
def test_rotate_needs_exactly_one_of_node_or_operator(root: Path, flags: tuple[str, ...]):
    result = certs(root, "rotate", "--district", D, *flags)
    assert result.exit_code == 1
    assert "exactly one" in flat(result.output)


def test_revoke_refuses_a_serial_that_is_not_hexadecimal(root: Path):
    crl_before = DistrictPaths(root, D).crl.read_bytes()
    result = certs(root, "revoke", "--district", D, "--serial", "xyz")
    assert result.exit_code == 1
    assert "serial must be hexadecimal" in flat(result.output)
    assert DistrictPaths(root, D).crl.read_bytes() == crl_before


def test_revoke_names_the_issuing_ca_and_status_shows_the_revocation(root: Path):
    paths = DistrictPaths(root, D)
    serial = f"{load(paths.operator_cert('bus-01')).serial_number:x}"
    result = certs(root, "revoke", "--district", D, "--serial", serial)
    assert result.exit_code == 0, result.output
    assert f"serial {serial} revoked in the list of CA {certops.active_ca_id(paths)}" in flat(
        result.output
    )
    rows = json.loads(certs(root, "status", "--district", D, "--json").output)
    by_serial = {r["serial"]: r for r in rows}
    assert by_serial[serial]["revoked"] is True and by_serial[serial]["warning"] == "revoked"


def test_status_of_a_fresh_district_passes_and_lists_every_certificate(root: Path):
    result = certs(root, "status", "--district", D, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert sorted(r["kind"] for r in rows) == ["ca", "node", "operator"]
    assert all(r["warning"] == "" and not r["revoked"] for r in rows)
    assert [r["active"] for r in rows if r["kind"] == "ca"] == [True]


def test_status_table_exits_1_and_says_renew_when_a_certificate_is_nearly_expired(
    root: Path, now: datetime
):
    """The table form (what a person reads) fails the same way --json does."""
    paths = DistrictPaths(root, D)
    certops.issue_to_files(paths, operator_identity(D, "bus-01"), now - timedelta(hours=60), 3)
    result = certs(root, "status", "--district", D)
    assert result.exit_code == 1
    assert "RENEW NOW" in result.output
    assert "operator" in result.output


@pytest.mark.xfail(
    strict=True,
    reason="BUG broker/cli/certs.py:170: once a warning widens the status table past its "
    "160 columns, serials and subjects are cut with '…', yet revoke --serial asks for the "
    "serial 'as `certs status` prints it'",
)
def test_status_table_prints_serials_and_subjects_whole_when_warning(root: Path, now: datetime):
    paths = DistrictPaths(root, D)
    certops.issue_to_files(paths, operator_identity(D, "bus-01"), now - timedelta(hours=60), 3)
    serial = f"{load(paths.operator_cert('bus-01')).serial_number:x}"
    result = certs(root, "status", "--district", D)
    assert "RENEW NOW" in result.output  # the premise: a warning row is shown
    assert serial in result.output
    assert operator_identity(D, "bus-01").spiffe_id in result.output


def test_status_of_a_district_without_a_ca_fails_clearly(tmp_path: Path):
    result = certs(tmp_path / "certs", "status", "--district", D)
    assert result.exit_code == 1
    assert f"no CA for district {D}" in flat(result.output)


def test_renew_due_renews_nothing_on_a_fresh_district(root: Path):
    before = DistrictPaths(root, D).node_cert.read_bytes()
    result = certs(root, "renew-due", "--district", D)
    assert result.exit_code == 0
    assert "0 certificate(s) renewed" in result.output
    assert DistrictPaths(root, D).node_cert.read_bytes() == before


@pytest.mark.xfail(
    strict=True,
    reason="BUG broker/cli/certs.py:110: renew-due of a district with no CA (a typo in "
    "--district or --dir of a timer) reports '0 certificate(s) renewed' and exits 0",
)
def test_renew_due_of_a_district_without_a_ca_fails(tmp_path: Path):
    result = certs(tmp_path / "certs", "renew-due", "--district", D)
    assert result.exit_code == 1


def test_rotate_ca_stages_through_the_cli_and_refuses_them_out_of_order(root: Path):
    paths = DistrictPaths(root, D)
    first = certops.active_ca_id(paths)
    retire_early = certs(root, "rotate-ca", "--district", D, "--stage", "retire")
    assert retire_early.exit_code == 1 and "nothing to retire" in flat(retire_early.output)
    published = certs(root, "rotate-ca", "--district", D, "--stage", "publish")
    assert published.exit_code == 0, published.output
    assert f"{first} still signs" in flat(published.output)
    again = certs(root, "rotate-ca", "--district", D, "--stage", "publish")
    assert again.exit_code == 1 and "already under way" in flat(again.output)
    assert certs(root, "rotate-ca", "--district", D, "--stage", "activate").exit_code == 0
    second = certops.active_ca_id(paths)
    assert second != first
    retired = certs(root, "rotate-ca", "--district", D, "--stage", "retire")
    assert retired.exit_code == 0, retired.output
    assert certops.trusted_ca_ids(paths) == [second]
    # Node and operator were re-issued by the new CA at activation: status still passes.
    assert certs(root, "status", "--district", D).exit_code == 0


def test_rotate_ca_refuses_an_unknown_stage(root: Path):
    result = certs(root, "rotate-ca", "--district", D, "--stage", "bogus")
    assert result.exit_code == 2
    assert certops.trusted_ca_ids(DistrictPaths(root, D)) == [
        certops.active_ca_id(DistrictPaths(root, D))
    ]


@pytest.mark.xfail(
    strict=True,
    reason="BUG broker/trust/certops.py:313 (leaf_certificates): an unreadable .pem under "
    "operators/ raises ValueError, and `certs status` dies with a traceback",
)
def test_status_reports_an_unreadable_certificate_file_clearly(root: Path):
    junk = DistrictPaths(root, D).dir / "operators" / "junk.pem"
    junk.write_bytes(b"\x00 not a certificate")
    result = certs(root, "status", "--district", D)
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # a reported error, not a crash
    assert "junk.pem" in flat(result.output)
