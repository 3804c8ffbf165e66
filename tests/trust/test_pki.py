"""Certificate primitives: district CAs, leaf certificates, files on disk, revocation lists.

Module under test: :mod:`broker.trust.pki`.
"""

from __future__ import annotations

import stat
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.trust import pki
from broker.trust.identity import node_identity, operator_identity

# Spelled in two parts so that no scanner for committed keys mistakes a test for one.
PEM_KEY_HEADER = b"-----BEGIN " + b"PRIVATE KEY-----"

D = "500111"
SKEW = timedelta(minutes=5)


@pytest.fixture
def ca(now: datetime) -> pki.KeyPair:
    return pki.create_ca(D, now)


E = TypeVar("E", bound=x509.ExtensionType)


def ext(cert: x509.Certificate, kind: type[E]) -> x509.Extension[E]:
    return cert.extensions.get_extension_for_class(kind)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def sans(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    san = ext(cert, x509.SubjectAlternativeName).value
    return (
        san.get_values_for_type(x509.UniformResourceIdentifier),
        san.get_values_for_type(x509.DNSName),
    )


# ------------------------------------------------------------------------------------ CAs


def test_a_ca_is_self_signed_p256_and_names_its_district(ca: pki.KeyPair):
    cert = ca.cert
    cert.verify_directly_issued_by(cert)
    assert cert.subject == cert.issuer
    assert isinstance(ca.key, ec.EllipticCurvePrivateKey)
    assert isinstance(ca.key.curve, ec.SECP256R1)
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == D
    assert D in str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def test_a_ca_may_sign_certificates_and_crls_but_no_sub_ca(ca: pki.KeyPair):
    bc = ext(ca.cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ext(ca.cert, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature


def test_a_ca_is_valid_from_five_minutes_back_for_its_days(now: datetime):
    cert = pki.create_ca(D, now, days=10).cert
    # Certificates keep whole seconds.
    assert abs(cert.not_valid_before_utc - (now - SKEW)) < timedelta(seconds=1)
    assert abs(cert.not_valid_after_utc - (now + timedelta(days=10))) < timedelta(seconds=1)
    default = pki.create_ca(D, now).cert
    assert default.not_valid_after_utc - default.not_valid_before_utc == pytest.approx(
        timedelta(days=pki.CA_DAYS) + SKEW, abs=timedelta(seconds=1)
    )


def test_two_cas_of_one_district_have_different_keys_serials_and_ids(now: datetime):
    a, b = pki.create_ca(D, now), pki.create_ca(D, now)
    assert a.cert.serial_number != b.cert.serial_number
    assert pki.ca_id(a.cert) != pki.ca_id(b.cert)
    with pytest.raises(InvalidSignature):
        b.cert.verify_directly_issued_by(a.cert)


def test_ca_id_is_16_hex_digits_of_the_subject_key_id_and_survives_pem(ca: pki.KeyPair):
    ident = pki.ca_id(ca.cert)
    ski = ext(ca.cert, x509.SubjectKeyIdentifier).value.digest
    assert ident == ski.hex()[:16] and len(ident) == 16
    int(ident, 16)
    reread = x509.load_pem_x509_certificate(ca.cert_pem())
    assert pki.ca_id(reread) == ident


def test_ca_id_of_a_certificate_without_a_key_id_is_an_error(now: datetime):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bare")])
    bare = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(x509.ExtensionNotFound):
        pki.ca_id(bare)


# ------------------------------------------------------------------------------------ leaves


def test_a_node_certificate_names_its_spiffe_id_and_dns_name(ca: pki.KeyPair, now: datetime):
    ident = node_identity(D)
    leaf = pki.issue(ca, ident, now).cert
    assert sans(leaf) == ([ident.spiffe_id], [ident.dns_name])
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == ident.dns_name


def test_extra_dns_names_follow_the_identitys_own(ca: pki.KeyPair, now: datetime):
    ident = node_identity(D)
    leaf = pki.issue(ca, ident, now, extra_dns=("broker.example", "10-0-0-1.example")).cert
    uris, dns = sans(leaf)
    assert uris == [ident.spiffe_id]  # still exactly one identity
    assert dns == [ident.dns_name, "broker.example", "10-0-0-1.example"]


def test_a_wildcard_dns_name_is_refused(ca: pki.KeyPair, now: datetime):
    """A certificate answers for the names it lists: never a whole family of them."""
    with pytest.raises(ValueError, match="no wildcard"):
        pki.issue(ca, node_identity(D), now, extra_dns=("*.node.500111.yikatong.cy",))


def test_a_node_may_serve_and_call_but_an_operator_only_call(ca: pki.KeyPair, now: datetime):
    node = pki.issue(ca, node_identity(D), now).cert
    op = pki.issue(ca, operator_identity(D, "bus-01"), now).cert
    assert list(ext(node, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    assert list(ext(op, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_a_leaf_is_no_ca_and_signs_only(ca: pki.KeyPair, now: datetime):
    leaf = pki.issue(ca, operator_identity(D, "bus-01"), now).cert
    bc = ext(leaf, x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = ext(leaf, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not (ku.value.key_cert_sign or ku.value.crl_sign or ku.value.key_encipherment)


def test_a_leaf_is_signed_by_its_ca_and_names_it(ca: pki.KeyPair, now: datetime):
    leaf = pki.issue(ca, node_identity(D), now).cert
    leaf.verify_directly_issued_by(ca.cert)
    assert leaf.issuer == ca.cert.subject
    assert pki.issuer_id(leaf) == pki.ca_id(ca.cert)
    other = pki.create_ca(D, now)
    with pytest.raises(InvalidSignature):
        leaf.verify_directly_issued_by(other.cert)
    assert pki.issuer_id(leaf) != pki.ca_id(other.cert)


def test_a_leaf_key_is_its_own_p256_key(ca: pki.KeyPair, now: datetime):
    pair = pki.issue(ca, node_identity(D), now)
    assert isinstance(pair.key.curve, ec.SECP256R1)
    assert pair.cert.public_key() == pair.key.public_key()
    assert pair.key.public_key() != ca.key.public_key()


def test_a_leaf_lives_its_days_from_five_minutes_back(ca: pki.KeyPair, now: datetime):
    leaf = pki.issue(ca, node_identity(D), now, days=2).cert
    assert abs(leaf.not_valid_before_utc - (now - SKEW)) < timedelta(seconds=1)
    assert abs(leaf.not_valid_after_utc - (now + timedelta(days=2))) < timedelta(seconds=1)
    default = pki.issue(ca, node_identity(D), now).cert
    assert abs(default.not_valid_after_utc - (now + timedelta(days=pki.LEAF_DAYS))) < timedelta(
        seconds=1
    )


def test_a_naive_now_is_taken_as_utc(now: datetime):
    """cryptography reads naive datetimes as UTC: callers must pass UTC (or aware) times."""
    naive = now.astimezone(UTC).replace(tzinfo=None)
    ca = pki.create_ca(D, naive)
    assert abs(ca.cert.not_valid_before_utc - (now - SKEW)) < timedelta(seconds=1)


def test_every_issue_gets_a_new_serial_and_key(ca: pki.KeyPair, now: datetime):
    a = pki.issue(ca, node_identity(D), now)
    b = pki.issue(ca, node_identity(D), now)
    assert a.cert.serial_number != b.cert.serial_number
    assert a.key_pem() != b.key_pem()


def test_a_key_pairs_repr_never_shows_the_key(ca: pki.KeyPair, now: datetime):
    pair = pki.issue(ca, node_identity(D), now)
    shown = repr(pair)
    assert "redacted" in shown and f"{pair.cert.serial_number:x}" in shown
    body = b"".join(pair.key_pem().splitlines()[1:-1]).decode()
    assert body[:20] not in shown and "PRIVATE" not in shown


def test_key_pem_is_unencrypted_pkcs8_and_cert_pem_reloads(ca: pki.KeyPair):
    assert ca.key_pem().startswith(PEM_KEY_HEADER)
    key = serialization.load_pem_private_key(ca.key_pem(), password=None)
    assert key.public_key() == ca.key.public_key()
    assert x509.load_pem_x509_certificate(ca.cert_pem()) == ca.cert


# ------------------------------------------------------------------------------------ files


def test_save_writes_the_key_0600_and_load_reads_the_pair_back(
    ca: pki.KeyPair, now: datetime, tmp_path: Path
):
    pair = pki.issue(ca, node_identity(D), now)
    cert_path, key_path = tmp_path / "d" / "node.pem", tmp_path / "d" / "node.key"
    pki.save(pair, cert_path, key_path)
    assert mode(key_path) == 0o600
    back = pki.load(cert_path, key_path)
    assert back.cert == pair.cert and back.key_pem() == pair.key_pem()
    assert sorted(p.name for p in cert_path.parent.iterdir()) == ["node.key", "node.pem"]


def test_write_private_replaces_a_readable_file_with_a_0600_one(tmp_path: Path):
    path = tmp_path / "secret.key"
    path.write_bytes(b"old")
    path.chmod(0o644)
    pki.write_private(path, b"new")
    assert path.read_bytes() == b"new" and mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret.key"]  # no temp file left


def test_write_public_replaces_the_file_whole_and_leaves_no_temp(tmp_path: Path):
    path = tmp_path / "sub" / "ca.pem"
    pki.write_public(path, b"one")
    pki.write_public(path, b"two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in path.parent.iterdir()] == ["ca.pem"]


def test_write_public_creates_missing_directories_and_is_not_writable_by_others(tmp_path: Path):
    path = tmp_path / "a" / "b" / "crl.pem"
    pki.write_public(path, b"x")
    assert path.read_bytes() == b"x"
    assert mode(path) & 0o022 == 0  # readable by all, writable only by its owner


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path):
    """The rename is the only step that changes what readers see."""
    target = tmp_path / "bundle.json"
    target.mkdir()  # something a file cannot replace
    with pytest.raises(OSError):
        pki.write_public(target, b"new")
    assert target.is_dir() and [p.name for p in tmp_path.iterdir()] == ["bundle.json"]


def test_append_line_adds_one_terminated_line_per_call(tmp_path: Path):
    log = tmp_path / "logs" / "issued.jsonl"
    pki.append_line(log, '{"serial": "1"}')
    pki.append_line(log, '{"serial": "2"}\n')
    assert log.read_text() == '{"serial": "1"}\n{"serial": "2"}\n'


def test_load_refuses_a_key_that_is_not_ec(ca: pki.KeyPair, tmp_path: Path):
    other = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pki.write_public(tmp_path / "ca.pem", ca.cert_pem())
    pki.write_private(tmp_path / "ca.key", other)
    with pytest.raises(ValueError, match="not an EC private key"):
        pki.load(tmp_path / "ca.pem", tmp_path / "ca.key")


def test_load_refuses_garbage(ca: pki.KeyPair, tmp_path: Path):
    pki.write_public(tmp_path / "ca.pem", b"not a certificate")
    pki.write_private(tmp_path / "ca.key", ca.key_pem())
    with pytest.raises(ValueError):
        pki.load(tmp_path / "ca.pem", tmp_path / "ca.key")


# ------------------------------------------------------------------------------------ CRLs


def test_a_crl_lists_the_revoked_serials_and_is_signed_by_its_ca(ca: pki.KeyPair, now: datetime):
    when = now.replace(microsecond=0)
    crl = pki.build_crl(ca, [(11, when), (0xABCDEF, when)], number=3, now=now)
    assert crl.is_signature_valid(ca.key.public_key())
    assert not crl.is_signature_valid(pki.create_ca(D, now).key.public_key())
    assert crl.issuer == ca.cert.subject
    assert sorted(r.serial_number for r in crl) == [11, 0xABCDEF]
    entry = crl.get_revoked_certificate_by_serial_number(11)
    assert entry is not None and entry.revocation_date_utc == when
    assert ext_crl_number(crl) == 3


def ext_crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def test_an_empty_crl_is_valid_and_lists_nothing(ca: pki.KeyPair, now: datetime):
    crl = pki.build_crl(ca, [], number=1, now=now)
    assert len(crl) == 0 and crl.is_signature_valid(ca.key.public_key())


def test_a_crl_is_current_from_five_minutes_back_for_its_days(ca: pki.KeyPair, now: datetime):
    crl = pki.build_crl(ca, [], number=1, now=now, days=2)
    assert crl.last_update_utc is not None and crl.next_update_utc is not None
    assert abs(crl.last_update_utc - (now - SKEW)) < timedelta(seconds=1)
    assert abs(crl.next_update_utc - (now + timedelta(days=2))) < timedelta(seconds=1)


def test_crl_issuer_id_is_the_ca_id_of_the_signer(ca: pki.KeyPair, now: datetime):
    other = pki.create_ca(D, now)
    assert pki.crl_issuer_id(pki.build_crl(ca, [], 1, now)) == pki.ca_id(ca.cert)
    assert pki.crl_issuer_id(pki.build_crl(other, [], 1, now)) == pki.ca_id(other.cert)


def test_load_crls_reads_none_one_or_several_in_order(ca: pki.KeyPair, now: datetime):
    other = pki.create_ca(D, now)
    a = pki.build_crl(ca, [(1, now)], 1, now)
    b = pki.build_crl(other, [(2, now)], 1, now)
    assert pki.load_crls(b"") == []
    assert pki.load_crls(b"no lists here\n") == []
    assert pki.load_crls(pki.crl_pem(a)) == [a]
    both = pki.load_crls(pki.crl_pem(a) + b"\n" + pki.crl_pem(b))
    assert both == [a, b]
    assert [pki.crl_issuer_id(c) for c in both] == [pki.ca_id(ca.cert), pki.ca_id(other.cert)]


def test_load_crls_refuses_a_garbled_list(ca: pki.KeyPair, now: datetime):
    good = pki.crl_pem(pki.build_crl(ca, [], 1, now))
    garbled = b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"
    with pytest.raises(ValueError):
        pki.load_crls(good + garbled)
    truncated = good[: len(good) // 2]
    with pytest.raises(ValueError):
        pki.load_crls(truncated)


# ------------------------------------------------------------------------------------ lock

# Another process asking for the lock without waiting: prints "held" or "free".
PROBE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    print("held")
else:
    print("free")
"""


def probe(lock: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(lock)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_locked_excludes_other_processes_until_released(tmp_path: Path):
    lock = tmp_path / "d" / ".lock"
    with pki.locked(lock):
        assert mode(lock) == 0o600
        assert probe(lock) == "held"
    assert probe(lock) == "free"


def test_locked_is_reentrant_in_one_thread_and_held_until_the_outermost_exit(tmp_path: Path):
    lock = tmp_path / ".lock"
    with pki.locked(lock):
        with pki.locked(lock):  # would deadlock if flock were taken twice
            assert probe(lock) == "held"
        assert probe(lock) == "held"  # the inner exit does not release it
    assert probe(lock) == "free"


def test_locked_makes_another_thread_wait(tmp_path: Path):
    lock = tmp_path / ".lock"
    order: list[str] = []
    entered = threading.Event()

    def other() -> None:
        entered.set()
        with pki.locked(lock):
            order.append("other")

    with pki.locked(lock):
        t = threading.Thread(target=other)
        t.start()
        entered.wait(5)
        time.sleep(0.2)
        order.append("first")
    t.join(5)
    assert order == ["first", "other"]


def test_locked_is_released_when_the_body_raises(tmp_path: Path):
    lock = tmp_path / ".lock"
    with pytest.raises(RuntimeError), pki.locked(lock):
        raise RuntimeError("boom")
    assert probe(lock) == "free"


def test_crl_number_reads_back_what_build_crl_was_given(ca: pki.KeyPair, now: datetime):
    assert pki.crl_number(pki.build_crl(ca, [], 41, now)) == 41
