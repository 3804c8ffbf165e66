"""broker/cli/trust.py: ``broker trust export``, ``fingerprint`` and ``import``, and the fingerprint
they print (verbatim, even with the bytes Rich would turn into emoji).

tests/trust/test_bundle.py covers an impostor bundle and the round trip on built
districts; tests/e2e/test_runbook.py runs both commands as subprocesses. These check the
command's own decisions: where the bundle and the fingerprint go, the first-use gate,
what is (not) stored when an import is refused, and broken inputs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from broker.cli.main import main
from broker.cli.trust import fingerprint
from broker.node.config import load_config
from broker.peers.bundles import held_bundle
from broker.trust import certops
from broker.trust.bundle import Bundle, SignedBundle, verify
from broker.trust.certops import DistrictPaths, RotationStage
from broker.trust.config import PeerConfig

DAZU, ANYUE, RONGCHANG, YONGCHUAN = "500111", "512021", "500153", "500118"


def trust(*args: str) -> Result:
    return CliRunner().invoke(main, ["trust", *args])


def flat(text: str) -> str:
    """The output with Rich's line wrapping undone."""
    return " ".join(text.split())


def openssl_fingerprint(pem_file: Path) -> str:
    """What operators compare by phone: openssl's SHA-256 fingerprint of the (first) CA."""
    if shutil.which("openssl"):
        out = subprocess.run(
            ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(pem_file)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return out.strip().split("=", 1)[1]
    cert = x509.load_pem_x509_certificates(pem_file.read_bytes())[0]
    digest = cert.fingerprint(hashes.SHA256()).hex().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def plain(fp: str) -> bool:
    """Whether a fingerprint has no byte AB or CD, which Rich turns into emoji (see below)."""
    return not {"AB", "CD"} & set(fp.split(":"))


def init_ca_where(paths: DistrictPaths, now: datetime, wanted: Callable[[str], bool]) -> None:
    """A new CA for ``paths`` whose fingerprint satisfies ``wanted`` (new keys until it does)."""
    for _ in range(1000):
        certops.init_ca(paths, now)
        if wanted(fingerprint(paths.ca_cert.read_text())):
            return
        shutil.rmtree(paths.dir)
    raise AssertionError("no CA with the wanted fingerprint in 1000 tries")


@dataclass
class Setup:
    root: Path
    config: Path
    exchange: Path

    def paths(self, district: str) -> DistrictPaths:
        return DistrictPaths(self.root, district)

    def peer(self, district: str) -> PeerConfig:
        p = load_config(self.config, env={}).peer(district)
        assert p is not None
        return p

    def export(self, district: str) -> Path:
        out = self.exchange / f"{district}.bundle.json"
        result = trust("export", "--district", district, "--dir", str(self.root), "--out", str(out))
        assert result.exit_code == 0, result.output
        return out


@pytest.fixture
def setup(tmp_path: Path, now: datetime) -> Setup:
    """Dazu's node config; Anyue a bundle peer, Rongchang a peer by CA file, Yongchuan none."""
    root = tmp_path / "certs"
    for code in (DAZU, YONGCHUAN):
        certops.init_ca(DistrictPaths(root, code), now)
    # Tests of the printed fingerprint read Anyue's: one Rich prints faithfully.
    init_ca_where(DistrictPaths(root, ANYUE), now, plain)
    config = tmp_path / "node.toml"
    config.write_text(
        f'district = "{DAZU}"\nlisten = "127.0.0.1:0"\n'
        f'[tls]\nca_file = "certs/{DAZU}/ca.pem"\ncert_file = "certs/{DAZU}/node.pem"\n'
        f'key_file = "certs/{DAZU}/node.key"\n'
        f'crl_file = "certs/{DAZU}/crl.pem"\n'
        '[registry]\npath = "var/registry.sqlite3"\n'
        f'[privacy]\nhash_key_file = "certs/{DAZU}/hash.key"\n'
        f'[[peers]]\ndistrict = "{ANYUE}"\naddress = "127.0.0.1:1"\n'
        f'bundle_file = "var/peers/{ANYUE}.bundle.json"\n'
        f'[[peers]]\ndistrict = "{RONGCHANG}"\naddress = "127.0.0.1:2"\n'
        f'ca_file = "certs/{RONGCHANG}/ca.pem"\n'
        f'crl_file = "certs/{RONGCHANG}/crl.pem"\n'
    )
    exchange = tmp_path / "exchange"
    exchange.mkdir()
    return Setup(root, config, exchange)


def test_fingerprint_matches_openssl(setup: Setup):
    ca_pem = setup.paths(ANYUE).ca_cert
    assert fingerprint(ca_pem.read_text()) == openssl_fingerprint(ca_pem)


def test_fingerprint_refuses_garbage():
    with pytest.raises(ValueError):
        fingerprint("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")


def test_export_writes_the_signed_bundle_and_prints_the_fingerprint_on_stderr(setup: Setup):
    out = setup.exchange / "anyue.json"
    result = trust("export", "--district", ANYUE, "--dir", str(setup.root), "--out", str(out))
    assert result.exit_code == 0, result.output
    exported = SignedBundle.from_json(out.read_bytes())
    assert exported == certops.read_bundle(setup.paths(ANYUE).bundle)
    verify(exported, ANYUE, None, 0)  # a neighbour can first-import it as it is
    assert result.stdout == ""
    want = openssl_fingerprint(setup.paths(ANYUE).ca_cert)
    assert "CA fingerprint (SHA-256):" in result.stderr
    assert want in "".join(result.stderr.split())


def test_export_without_out_writes_only_the_bundle_to_stdout(setup: Setup):
    """stdout can be redirected to a file: the fingerprint must not land in the bundle."""
    result = trust("export", "--district", ANYUE, "--dir", str(setup.root))
    assert result.exit_code == 0, result.output
    assert SignedBundle.from_json(result.stdout.encode()) == certops.read_bundle(
        setup.paths(ANYUE).bundle
    )
    assert "fingerprint" not in result.stdout
    assert "fingerprint" in result.stderr


def test_export_prints_one_fingerprint_per_ca_while_a_rotation_overlaps(
    tmp_path: Path, now: datetime
):
    paths = DistrictPaths(tmp_path / "certs", ANYUE)
    for _ in range(100):  # until both CAs have fingerprints Rich prints faithfully
        init_ca_where(paths, now, plain)
        certops.rotate_ca(paths, RotationStage.PUBLISH, now)
        cas = x509.load_pem_x509_certificates(paths.ca_cert.read_bytes())
        pems = [ca.public_bytes(serialization.Encoding.PEM).decode() for ca in cas]
        if all(plain(fingerprint(p)) for p in pems):
            break
        shutil.rmtree(paths.dir)
    result = trust("export", "--district", ANYUE, "--dir", str(paths.root))
    assert result.exit_code == 0, result.output
    assert len(pems) == 2
    printed = "".join(result.stderr.split())
    assert printed == "".join(f"CAfingerprint(SHA-256):{fingerprint(p)}" for p in pems)


def test_export_of_a_district_without_a_bundle_fails_clearly(setup: Setup):
    result = trust("export", "--district", RONGCHANG, "--dir", str(setup.root))
    assert result.exit_code == 1
    assert f"district {RONGCHANG} has no bundle" in flat(result.output)
    assert "init-ca" in result.output


def test_export_prints_the_fingerprint_on_one_line_as_openssl_does(setup: Setup):
    result = trust("export", "--district", ANYUE, "--dir", str(setup.root))
    want = openssl_fingerprint(setup.paths(ANYUE).ca_cert)
    assert f"CA fingerprint (SHA-256): {want}" in result.stderr.splitlines()


def mangled_by_rich(fp: str) -> bool:
    """AB or CD at an odd byte: where Rich's ':name:' emoji pattern lands (it pairs colons
    left to right from the one after the first byte), so ':AB:' / ':CD:' become emoji."""
    return any(b in ("AB", "CD") for b in fp.split(":")[1:31:2])


def test_every_fingerprint_is_printed_exactly_even_with_ab_or_cd_bytes(
    tmp_path: Path, now: datetime
):
    paths = DistrictPaths(tmp_path / "certs", ANYUE)
    init_ca_where(paths, now, mangled_by_rich)
    result = trust("export", "--district", ANYUE, "--dir", str(paths.root))
    assert result.exit_code == 0
    assert openssl_fingerprint(paths.ca_cert) in "".join(result.stderr.split())


def test_import_without_first_use_refuses_prints_the_fingerprint_and_stores_nothing(
    setup: Setup,
):
    bundle = setup.export(ANYUE)
    result = trust("import", str(bundle), "--config", str(setup.config))
    assert result.exit_code == 1
    want = openssl_fingerprint(setup.paths(ANYUE).ca_cert)
    assert want in "".join(result.stderr.split())
    assert "--first-use" in flat(result.stderr)
    assert held_bundle(setup.peer(ANYUE)) is None


def test_import_with_first_use_stores_the_bundle_for_the_peer(setup: Setup):
    bundle = setup.export(ANYUE)
    result = trust("import", str(bundle), "--config", str(setup.config), "--first-use")
    assert result.exit_code == 0, result.output
    peer = setup.peer(ANYUE)
    assert peer.bundle_file is not None
    assert SignedBundle.from_json(peer.bundle_file.read_bytes()) == SignedBundle.from_json(
        bundle.read_bytes()
    )
    held = held_bundle(peer)
    assert held is not None and held.district == ANYUE and held.sequence == 1
    assert f"bundle 1 of {ANYUE} stored in {peer.bundle_file}" in flat(result.output)


@pytest.mark.parametrize("flags", [(), ("--first-use",)])
def test_the_same_bundle_again_is_already_held_and_rewrites_nothing(
    setup: Setup, flags: tuple[str, ...]
):
    bundle = setup.export(ANYUE)
    assert trust("import", str(bundle), "--config", str(setup.config), "--first-use").exit_code == 0
    peer = setup.peer(ANYUE)
    assert peer.bundle_file is not None
    stat_before = peer.bundle_file.stat().st_mtime_ns
    result = trust("import", str(bundle), "--config", str(setup.config), *flags)
    assert result.exit_code == 0, result.output
    assert f"bundle 1 of {ANYUE} is already held" in flat(result.output)
    assert peer.bundle_file.stat().st_mtime_ns == stat_before


def test_a_later_bundle_signed_by_the_held_ca_needs_no_first_use(setup: Setup, now: datetime):
    assert (
        trust("import", str(setup.export(ANYUE)), "--config", str(setup.config), "--first-use")
    ).exit_code == 0
    certops.rotate_ca(setup.paths(ANYUE), RotationStage.PUBLISH, now)  # bundle sequence 2
    result = trust("import", str(setup.export(ANYUE)), "--config", str(setup.config))
    assert result.exit_code == 0, result.output
    held = held_bundle(setup.peer(ANYUE))
    assert held is not None and held.sequence == 2 and len(held.cas_pem) == 2


def test_a_bundle_of_a_district_that_is_not_a_peer_is_refused(setup: Setup):
    bundle = setup.export(YONGCHUAN)
    result = trust("import", str(bundle), "--config", str(setup.config), "--first-use")
    assert result.exit_code == 1
    assert f"district {YONGCHUAN} is not a peer in {setup.config}" in flat(result.output)
    assert not (setup.config.parent / "var" / "peers").exists()


def test_a_peer_without_a_bundle_file_is_refused_even_on_first_use(setup: Setup, now: datetime):
    """Rongchang is configured by CA file: there is nowhere to keep a bundle for it."""
    certops.init_ca(setup.paths(RONGCHANG), now)
    bundle = setup.export(RONGCHANG)
    result = trust("import", str(bundle), "--config", str(setup.config), "--first-use")
    assert result.exit_code == 1
    assert "no bundle_file configured" in flat(result.output)


def test_a_tampered_bundle_is_refused_on_first_use_and_nothing_stored(setup: Setup):
    bundle = setup.export(ANYUE)
    raw = json.loads(bundle.read_bytes())
    raw["document"] = raw["document"].replace('"sequence":1', '"sequence":9')
    bundle.write_text(json.dumps(raw))
    result = trust("import", str(bundle), "--config", str(setup.config), "--first-use")
    assert result.exit_code == 1
    assert "signature does not verify" in flat(result.output)
    assert held_bundle(setup.peer(ANYUE)) is None


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"\x00\xff garbage", "bundle file is malformed"),
        (b"", "bundle file is malformed"),
        (b'{"document": "{}", "signer": "x", "signature": ""}', "bundle document is malformed"),
    ],
)
def test_a_broken_bundle_file_is_refused_with_its_reason(
    setup: Setup, tmp_path: Path, content: bytes, reason: str
):
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    result = trust("import", str(bad), "--config", str(setup.config), "--first-use")
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # reported, not a traceback
    assert reason in flat(result.output)


def test_import_with_a_missing_config_fails_clearly(setup: Setup, tmp_path: Path):
    bundle = setup.export(ANYUE)
    missing = tmp_path / "nowhere.toml"
    result = trust("import", str(bundle), "--config", str(missing), "--first-use")
    assert result.exit_code == 1
    assert f"config file {missing} does not exist" in flat(result.output)


def test_import_of_a_missing_bundle_file_is_a_usage_error(setup: Setup, tmp_path: Path):
    result = trust("import", str(tmp_path / "none.json"), "--config", str(setup.config))
    assert result.exit_code == 2
    assert "does not exist" in result.output


# ---------------------------------------------------------------- a neighbour that missed a step


def rotated_behind_our_back(setup: Setup, now: datetime) -> Path:
    """Anyue's first bundle imported here; then a whole CA rotation we never saw a bundle of."""
    first = trust("import", str(setup.export(ANYUE)), "--config", str(setup.config), "--first-use")
    assert first.exit_code == 0, first.output
    for stage in (RotationStage.PUBLISH, RotationStage.ACTIVATE, RotationStage.RETIRE):
        certops.rotate_ca(setup.paths(ANYUE), stage, now)
    return setup.export(ANYUE)


def test_a_bundle_signed_only_by_a_ca_we_never_saw_is_refused_even_on_first_use(
    setup: Setup, now: datetime
):
    latest = rotated_behind_our_back(setup, now)
    held = held_bundle(setup.peer(ANYUE))
    for flags in ((), ("--first-use",), ("--replace",)):
        result = trust("import", str(latest), "--config", str(setup.config), *flags)
        assert result.exit_code == 1, (flags, result.output)
    assert held_bundle(setup.peer(ANYUE)) == held


def test_first_use_with_replace_re_bootstraps_a_peer_that_missed_a_ca_rotation(
    setup: Setup, now: datetime
):
    latest = rotated_behind_our_back(setup, now)
    result = trust("import", str(latest), "--config", str(setup.config), "--first-use", "--replace")
    assert result.exit_code == 0, result.output
    stored = held_bundle(setup.peer(ANYUE))
    sent = Bundle.parse(SignedBundle.from_json(latest.read_bytes()).document)
    assert stored == sent and len(stored.cas_pem) == 1  # only the new CA now
    assert fingerprint(sent.cas_pem[0]) in "".join(result.stderr.split())
    again = trust("import", str(latest), "--config", str(setup.config))
    assert again.exit_code == 0 and "already held" in again.output  # and later ones flow again


def test_trust_status_shows_what_each_peer_holds_and_fetched(setup: Setup, now: datetime):
    from broker.trust.bundle import note_served

    config = setup.config.read_text().replace(
        "[[peers]]", f'[trust]\nbundle_file = "certs/{DAZU}/bundle.json"\n[[peers]]', 1
    )
    setup.config.write_text(config)
    assert trust("import", str(setup.export(ANYUE)), "--config", str(setup.config), "--first-use")
    ours = setup.paths(DAZU).bundle
    before = trust("status", "--config", str(setup.config))
    assert before.exit_code == 0, before.output
    lines = {line.split(":")[0]: line for line in before.stdout.splitlines()}
    assert lines["our bundle"] == "our bundle: sequence 1"
    assert "held 1 issued" in lines[ANYUE] and "never fetched ours (BEHIND)" in lines[ANYUE]
    assert "none held" in lines[RONGCHANG]
    note_served(ours, ANYUE, 1, now)
    certops.rotate_ca(setup.paths(DAZU), RotationStage.PUBLISH, now)  # our bundle: sequence 2
    after = trust("status", "--config", str(setup.config))
    lines = {line.split(":")[0]: line for line in after.stdout.splitlines()}
    assert lines["our bundle"] == "our bundle: sequence 2"
    assert "fetched our 1 at" in lines[ANYUE] and lines[ANYUE].endswith("(BEHIND)")


# ---------------------------------------------------------------- fingerprints, verbatim


def cd_where_rich_finds_emoji(fp: str) -> bool:
    """A byte CD where Rich's emoji pattern lands (see :func:`mangled_by_rich`): 96:CD:22."""
    return "CD" in fp.split(":")[1:31:2]


@pytest.fixture
def cd_bundle(tmp_path: Path, now: datetime) -> tuple[Path, str]:
    """Anyue's exported bundle, whose CA's fingerprint has ``:CD:`` (new CAs until one does)."""
    paths = DistrictPaths(tmp_path / "cd" / "certs", ANYUE)
    init_ca_where(paths, now, cd_where_rich_finds_emoji)
    out = tmp_path / "cd" / "anyue.bundle.json"
    result = trust("export", "--district", ANYUE, "--dir", str(paths.root), "--out", str(out))
    assert result.exit_code == 0, result.output
    return out, openssl_fingerprint(paths.ca_cert)


def test_fingerprint_shows_whose_bundle_and_its_ca_fingerprint_on_stdout(
    cd_bundle: tuple[Path, str],
):
    bundle, want = cd_bundle
    assert ":CD:" in want  # the premise: Rich's default console would print 💿 here
    result = trust("fingerprint", str(bundle))
    assert result.exit_code == 0, result.output
    held = Bundle.parse(SignedBundle.from_json(bundle.read_bytes()).document)
    assert result.stdout.splitlines() == [
        f"bundle 1 of district {ANYUE}, issued {held.issued_at}",
        f"CA fingerprint (SHA-256): {want}",
    ]


def test_the_fingerprint_is_printed_verbatim_by_every_command_piped_at_40_columns(
    cd_bundle: tuple[Path, str], setup: Setup
):
    """export, fingerprint and a refused import, as processes with COLUMNS=40, piped."""
    bundle, want = cd_bundle
    line = f"CA fingerprint (SHA-256): {want}"
    env = {**os.environ, "COLUMNS": "40"}

    def broker(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "broker", "trust", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    exported = broker("export", "--district", ANYUE, "--dir", str(bundle.parent / "certs"))
    assert exported.returncode == 0 and exported.stderr.splitlines() == [line]
    shown = broker("fingerprint", str(bundle))
    assert shown.returncode == 0 and shown.stdout.splitlines()[1:] == [line]
    # Setup's config has Anyue as a bundle peer: no bundle held, so it refuses and shows it.
    refused = broker("import", str(bundle), "--config", str(setup.config))
    assert refused.returncode == 1
    first, error = refused.stderr.splitlines()
    assert first == line
    assert error.startswith("error: no bundle held for this district yet") and error.endswith(
        "then repeat with --first-use"
    )


def test_fingerprint_refuses_a_bundle_its_own_ca_did_not_sign(
    cd_bundle: tuple[Path, str], tmp_path: Path
):
    bundle, _ = cd_bundle
    raw = json.loads(bundle.read_bytes())
    raw["document"] = raw["document"].replace('"sequence":1', '"sequence":9')
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(raw))
    result = trust("fingerprint", str(forged))
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"error: {forged}: bundle refused:")


def test_fingerprint_of_a_file_that_is_no_bundle_is_refused(tmp_path: Path):
    junk = tmp_path / "junk.json"
    junk.write_bytes(b"\x00\xff garbage")
    result = trust("fingerprint", str(junk))
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert "bundle file is malformed" in result.stderr
