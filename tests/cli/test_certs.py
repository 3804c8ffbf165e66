"""broker/cli/certs.py: the ``broker certs`` commands as operations staff run them.

tests/cli/test_main.py covers key modes, SPIFFE identities, init-ca twice, issue with
both kinds and a bad operator id; tests/trust/test_certops.py covers status --json after
ageing, renew-due and revoke of a known serial. These add what the CLI itself decides:
which flag combinations and values it refuses, rotate (with --revoke-old and
--next-epoch), rotate-ca's stages, status's table form, --all and exit code, serial,
epoch and publish-epoch, and how it treats a district it has no CA for. At the end:
the runbook's marked blocks (tests/runbook.py) run as written against a real store,
and a running node refusing an operator's certificate retired by rotate --revoke-old.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner, Result
from cryptography import x509

from broker._proto.yikatong.v1 import types_pb2
from broker.cards.model import CardRef
from broker.cli.main import main
from broker.trust import certops
from broker.trust.bundle import Bundle, verify
from broker.trust.certops import DistrictPaths
from broker.trust.identity import node_identity, operator_identity
from broker.trust.pki import build_crl, ca_id, crl_number, crl_pem, load_crls, write_public
from broker.trust.tls import spiffe_ids
from tests.conftest import DAZU, Cluster
from tests.helpers import channel, check_request, gate_stub
from tests.runbook import RunbookError, blocks, file_block, run_block

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
    assert f"no CA for district {D}" in flat(result.output)
    assert not (tmp_path / "certs").exists()


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


def test_renew_due_of_a_district_without_a_ca_fails(tmp_path: Path):
    """A typo in --district or --dir of a timer is an error, not '0 renewed'."""
    result = certs(tmp_path / "certs", "renew-due", "--district", D)
    assert result.exit_code == 1
    assert f"no CA for district {D}" in flat(result.output)
    assert not (tmp_path / "certs").exists()


def test_rotate_ca_stages_through_the_cli_and_refuses_them_out_of_order(root: Path):
    paths = DistrictPaths(root, D)
    first = certops.active_ca_id(paths)
    # No node here to note peers' fetches: --force skips that check (tested with a node in
    # tests/e2e/test_missed_rotation.py); the stages' own order is still enforced.
    retire_early = certs(root, "rotate-ca", "--district", D, "--stage", "retire", "--force")
    assert retire_early.exit_code == 1 and "nothing to retire" in flat(retire_early.output)
    published = certs(root, "rotate-ca", "--district", D, "--stage", "publish")
    assert published.exit_code == 0, published.output
    assert f"{first} still signs" in flat(published.output)
    again = certs(root, "rotate-ca", "--district", D, "--stage", "publish")
    assert again.exit_code == 1 and "already under way" in flat(again.output)
    activated = certs(root, "rotate-ca", "--district", D, "--stage", "activate", "--force")
    assert activated.exit_code == 0, activated.output
    second = certops.active_ca_id(paths)
    assert second != first
    retired = certs(root, "rotate-ca", "--district", D, "--stage", "retire", "--force")
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


def test_status_reports_an_unreadable_certificate_file_clearly(root: Path):
    junk = DistrictPaths(root, D).dir / "operators" / "junk.pem"
    junk.write_bytes(b"\x00 not a certificate")
    result = certs(root, "status", "--district", D)
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # a reported error, not a crash
    assert "junk.pem" in flat(result.output)


def test_status_reports_a_certificate_that_names_no_identity_clearly(root: Path):
    """A valid certificate dropped among the operators' (the district's CA, copied by hand)
    parses but names no SPIFFE identity: reported with its file, not a traceback."""
    paths = DistrictPaths(root, D)
    stray = paths.dir / "operators" / "stray-ca.pem"
    stray.write_bytes(
        paths.ca_cert.read_bytes().split(b"-----END CERTIFICATE-----")[0]
        + b"-----END CERTIFICATE-----\n"
    )
    result = certs(root, "status", "--district", D)
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert "stray-ca.pem" in flat(result.output)


# ------------------------------------------------------------------ rotate: distrusted keys


def serial_hex(path: Path) -> str:
    return f"{load(path).serial_number:x}"


def status_rows(root: Path, *flags: str) -> dict[str, dict[str, object]]:
    result = certs(root, "status", "--district", D, "--json", *flags)
    assert result.exit_code == 0, result.output
    return {str(r["serial"]): r for r in json.loads(result.output)}


def test_rotate_revoke_old_revokes_the_old_serial_and_status_all_shows_both(root: Path):
    paths = DistrictPaths(root, D)
    old = serial_hex(paths.operator_cert("bus-01"))
    result = certs(root, "rotate", "--district", D, "--operator", "bus-01", "--revoke-old")
    assert result.exit_code == 0, result.output
    new = serial_hex(paths.operator_cert("bus-01"))
    out = flat(result.output)
    assert f"(serial {new})" in out
    assert f"old serial {old} revoked in the list of CA {certops.active_ca_id(paths)}" in out
    (crl,) = load_crls(paths.crl.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(int(old, 16)) is not None
    assert crl.get_revoked_certificate_by_serial_number(int(new, 16)) is None
    assert old not in status_rows(root)  # without --all: only what is held now
    rows = status_rows(root, "--all")
    assert rows[old]["revoked"] is True and rows[old]["current"] is False
    assert rows[old]["warning"] == "revoked"
    assert rows[new]["revoked"] is False and rows[new]["current"] is True
    assert rows[new]["warning"] == ""


def test_rotate_without_revoke_old_says_the_old_certificate_stays_valid(root: Path):
    paths = DistrictPaths(root, D)
    old = serial_hex(paths.operator_cert("bus-01"))
    result = certs(root, "rotate", "--district", D, "--operator", "bus-01")
    assert f"old serial {old} stays valid until it expires" in flat(result.output)
    assert status_rows(root, "--all")[old]["warning"] == "replaced, still valid until it expires"


def test_status_all_table_marks_replaced_certificates(root: Path):
    assert certs(root, "rotate", "--district", D, "--operator", "bus-01").exit_code == 0
    result = certs(root, "status", "--district", D, "--all")
    assert result.exit_code == 0, result.output
    assert "(replaced)" in result.output and "still valid" in flat(result.output)
    assert "(replaced)" not in certs(root, "status", "--district", D).output


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--node", "--revoke-old"), "once its new one is deployed"),
        (("--operator", "bus-01", "--next-epoch"), "use it with --node"),
    ],
)
def test_rotate_refuses_revoke_old_for_the_node_and_next_epoch_for_operators(
    root: Path, flags: tuple[str, ...], message: str
):
    before = {f: f.read_bytes() for f in sorted(root.rglob("*.pem"))}
    result = certs(root, "rotate", "--district", D, *flags)
    assert result.exit_code == 1 and message in flat(result.output)
    assert {f: f.read_bytes() for f in sorted(root.rglob("*.pem"))} == before


def test_serial_prints_the_serial_held_now(root: Path):
    paths = DistrictPaths(root, D)
    node = certs(root, "serial", "--district", D, "--node")
    assert node.exit_code == 0 and node.output == serial_hex(paths.node_cert) + "\n"
    op = certs(root, "serial", "--district", D, "--operator", "bus-01")
    assert op.output.strip() == serial_hex(paths.operator_cert("bus-01"))
    missing = certs(root, "serial", "--district", D, "--operator", "ghost-01")
    assert missing.exit_code == 1 and "no certificate for" in flat(missing.output)


# ------------------------------------------------------------------ node epochs


def test_a_node_epoch_move_through_the_cli(root: Path):
    paths = DistrictPaths(root, D)
    assert flat(certs(root, "epoch", "--district", D).output) == (
        f"epoch 1: e1.node.{D}.yikatong.cy"
    )
    early = certs(root, "publish-epoch", "--district", D)
    assert early.exit_code == 1 and "no node epoch move is pending" in flat(early.output)
    old = serial_hex(paths.node_cert)
    moved = certs(root, "rotate", "--district", D, "--node", "--next-epoch")
    assert moved.exit_code == 0, moved.output
    out = flat(moved.output)
    assert f"names e1.node.{D}.yikatong.cy and e2.node.{D}.yikatong.cy" in out
    assert f"`broker certs revoke --serial {old}`" in out
    assert "moving to epoch 2" in flat(certs(root, "epoch", "--district", D).output)
    too_soon = certs(root, "revoke", "--district", D, "--serial", old)
    assert too_soon.exit_code == 1 and "publish-epoch` first" in flat(too_soon.output)
    published = certs(root, "publish-epoch", "--district", D)
    assert published.exit_code == 0, published.output
    assert f"bundle 2 names the node e2.node.{D}.yikatong.cy" in flat(published.output)
    assert certs(root, "revoke", "--district", D, "--serial", old).exit_code == 0


def test_epoch_of_a_district_without_a_ca_fails(tmp_path: Path):
    result = certs(tmp_path / "certs", "epoch", "--district", D)
    assert result.exit_code == 1 and f"no CA for district {D}" in flat(result.output)


def test_revoke_force_revokes_a_node_serial_during_a_move(root: Path):
    paths = DistrictPaths(root, D)
    old = serial_hex(paths.node_cert)
    assert certs(root, "rotate", "--district", D, "--node", "--next-epoch").exit_code == 0
    forced = certs(root, "revoke", "--district", D, "--serial", old, "--force")
    assert forced.exit_code == 0, forced.output
    assert status_rows(root, "--all")[old]["revoked"] is True


# ------------------------------------------------------------------ renew-due output


def test_renew_due_re_signs_a_list_lapsing_tomorrow_and_says_what_it_published(
    root: Path, now: datetime
):
    """A list written with one day left (an old timer's last run) is re-signed now."""
    paths = DistrictPaths(root, D)
    ca = certops.active_ca(paths)
    (crl,) = load_crls(paths.crl.read_bytes())
    write_public(paths.crl, crl_pem(build_crl(ca, [], crl_number(crl) + 1, now, days=1)))
    result = certs(root, "renew-due", "--district", D)
    assert result.exit_code == 0, result.output
    out = flat(result.output)
    assert f"re-signed the revocation list of CA {ca_id(ca.cert)}" in out
    assert "bundle 2 published" in out and "0 certificate(s) renewed" in out
    (renewed,) = load_crls(paths.crl.read_bytes())
    assert crl_number(renewed) == crl_number(crl) + 2


# ------------------------------------------------------------------ plain output


def test_init_ca_names_the_ca_certificates_and_the_trust_bundle_apart(tmp_path: Path):
    """ca.pem is the CA certificates; "trust bundle" is bundle.json only (as in the runbook)."""
    r = tmp_path / "certs"
    result = certs(r, "init-ca", "--district", D)
    assert result.exit_code == 0, result.output
    paths = DistrictPaths(r, D)
    assert result.stdout.splitlines()[1:] == [
        f"CA certificates: {paths.ca_cert}",
        f"signed trust bundle: {paths.bundle}",
    ]


def test_paths_and_serials_are_printed_verbatim_piped_at_40_columns(tmp_path: Path):
    """As processes with COLUMNS=40: a store whose path has ':cd:', brackets and length."""
    r = tmp_path / "a:cd:b" / "[red]x[/red]" / ("long-directory-name-" * 4) / "certs"
    env = {**os.environ, "COLUMNS": "40"}

    def broker(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "broker", "certs", *args, "--dir", str(r)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    refused = broker("issue", "--district", D, "--node")
    assert refused.returncode == 1
    assert refused.stderr == f"error: no CA for district {D} under {r}\n"
    made = broker("init-ca", "--district", D)
    assert made.returncode == 0, made.stderr
    assert f"CA certificates: {DistrictPaths(r, D).ca_cert}" in made.stdout.splitlines()
    issued = broker("issue", "--district", D, "--operator", "bus-01")
    cert = DistrictPaths(r, D).operator_cert("bus-01")
    assert issued.stdout == f"{operator_identity(D, 'bus-01').spiffe_id} → {cert}\n"
    serial = broker("serial", "--district", D, "--operator", "bus-01")
    assert serial.stdout == f"{load(cert).serial_number:x}\n"
    table = broker("status", "--district", D)
    assert table.returncode == 0, table.stderr
    assert f"{load(cert).serial_number:x}" in table.stdout  # the table is 160 wide, cells whole


# ------------------------------------------------------------------ runbook blocks

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def test_blocks_returns_each_marked_sh_block_in_order(tmp_path: Path):
    doc = tmp_path / "ops.md"
    doc.write_text(
        "# ops\n"
        "<!-- runbook: demo -->\n```sh\necho one\necho two\n```\n"
        "```sh\necho unmarked\n```\n"
        "<!-- runbook: other -->\n```bash\necho other\n```\n"
        "<!-- runbook: demo -->\n```sh\necho three\n```\n"
    )
    assert blocks(doc, "demo") == ["echo one\necho two\n", "echo three\n"]
    assert blocks(doc, "other") == ["echo other\n"]
    assert blocks(doc, "missing") == []


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("<!-- runbook: demo -->\n\n```sh\necho x\n```\n", "followed at once"),
        ("<!-- runbook: demo -->\n```python\nprint()\n```\n", "followed at once"),
        ("<!-- runbook: demo -->\n```sh\necho x\n", "never closed"),
        ("<!-- runbook: demo -->\n", "followed at once"),
    ],
)
def test_a_marker_without_a_whole_sh_block_is_an_error(tmp_path: Path, text: str, reason: str):
    doc = tmp_path / "ops.md"
    doc.write_text(text)
    with pytest.raises(RunbookError, match=reason):
        blocks(doc, "demo")


def test_file_block_returns_the_one_block_marked_as_that_file(tmp_path: Path):
    doc = tmp_path / "ops.md"
    doc.write_text(
        '<!-- runbook-file: node.toml -->\n```toml\ndistrict = "500111"\n```\n'
        "<!-- runbook-file: twice.toml -->\n```toml\na = 1\n```\n"
        "<!-- runbook-file: twice.toml -->\n```toml\na = 2\n```\n"
    )
    assert file_block(doc, "node.toml") == 'district = "500111"\n'
    for name in ("twice.toml", "missing.toml"):
        with pytest.raises(RunbookError, match=f"blocks marked as file {name}, not one"):
            file_block(doc, name)


def test_run_block_uses_bash_strict_mode_the_given_variables_and_the_venvs_broker(
    tmp_path: Path,
):
    ok = run_block('echo "$DISTRICT"; command -v broker', {"DISTRICT": D}, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    district, where = ok.stdout.split()
    assert district == D and Path(where).parent == Path(sys.executable).parent
    assert run_block('echo "$UNSET_RUNBOOK_VAR"', {}).returncode != 0  # -u
    assert run_block("false | true\necho after", {}).stdout == ""  # -o pipefail, -e


def test_the_runbooks_marked_blocks_are_found():
    assert len(blocks(OPERATIONS, "compromised-node-key")) == 3
    assert len(blocks(OPERATIONS, "distrusted-operator-key")) == 1


def test_the_runbooks_compromised_node_key_procedure_runs_as_written(root: Path):
    """Steps 1, 3 and 4 of the runbook against a real store; step 2 is a file copy."""
    paths = DistrictPaths(root, D)
    env = {"DIR": str(root), "DISTRICT": D}
    old = load(paths.node_cert)
    bundle_before = certops.read_bundle(paths.bundle)
    assert bundle_before is not None
    issue_step, publish_step, revoke_step = blocks(OPERATIONS, "compromised-node-key")

    done = run_block(issue_step, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{old.serial_number:x}" in done.stdout  # what the operator notes for step 4
    moving = load(paths.node_cert)
    assert [
        f"node.{D}.yikatong.cy",
        f"e1.node.{D}.yikatong.cy",
        f"e2.node.{D}.yikatong.cy",
    ] == moving.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.DNSName)

    done = run_block(publish_step, env)
    assert done.returncode == 0, done.stdout + done.stderr
    signed = certops.read_bundle(paths.bundle)
    assert signed is not None
    bundle = verify(signed, D, Bundle.parse(bundle_before.document).cas(), 1)  # a peer's check
    assert bundle.node_name == f"e2.node.{D}.yikatong.cy"

    done = run_block(revoke_step, {**env, "OLD_SERIAL": f"{old.serial_number:x}"})
    assert done.returncode == 0, done.stdout + done.stderr
    (crl,) = load_crls(paths.crl.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(old.serial_number) is not None
    assert crl.get_revoked_certificate_by_serial_number(moving.serial_number) is None
    held = certops.read_bundle(paths.bundle)
    assert held is not None and crl_pem(crl).decode() in Bundle.parse(held.document).crls_pem


def test_the_runbooks_distrusted_operator_key_block_runs_as_written(root: Path):
    paths = DistrictPaths(root, D)
    old = serial_hex(paths.operator_cert("bus-01"))
    (block,) = blocks(OPERATIONS, "distrusted-operator-key")
    done = run_block(block, {"DIR": str(root), "DISTRICT": D, "OPERATOR": "bus-01"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert old in done.stdout and "revoked" in done.stdout
    assert status_rows(root, "--all")[old]["revoked"] is True


# ------------------------------------------------------------------ on a running node


async def test_a_running_node_refuses_the_old_certificate_after_rotate_revoke_old(
    cluster: Cluster,
):
    """The distrusted key is refused by the district's own node; the new one is served."""
    s = cluster.setups[DAZU]
    card = CardRef(DAZU, s.cards[0].ref.card_number)
    ca_pem = s.paths.ca_cert.read_bytes()
    old = s.operator_cert.read_bytes(), s.operator_key.read_bytes()
    result = await asyncio.to_thread(
        certs,
        s.paths.root,
        "rotate",
        "--district",
        DAZU,
        "--operator",
        s.operator_id,
        "--revoke-old",
    )
    assert result.exit_code == 0, result.output
    stale = channel(cluster.nodes[DAZU].address, DAZU, ca_pem, *old)
    fresh = channel(
        cluster.nodes[DAZU].address,
        DAZU,
        ca_pem,
        s.operator_cert.read_bytes(),
        s.operator_key.read_bytes(),
    )
    try:
        deadline = time.monotonic() + 5
        while True:
            try:
                await gate_stub(stale).Check(check_request(card, s.operator_id), timeout=5)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "revoked" in (exc.details() or "")
                break
            assert time.monotonic() < deadline, "the old certificate was still served after 5 s"
            await asyncio.sleep(0.1)
        decision = await gate_stub(fresh).Check(check_request(card, s.operator_id), timeout=5)
        assert decision.source == types_pb2.DECISION_SOURCE_HOME  # answered by its own registry
    finally:
        await stale.close()
        await fresh.close()
