"""Certificate primitives: district CAs, node and operator certificates, revocation lists.

Every district has its own CA. Leaf certificates name their holder in a URI
SAN (``spiffe://<district>.yikatong.cy/node`` or ``.../operator/<id>``) plus
DNS SANs for hostname checks, never a wildcard. Keys are ECDSA P-256, written
with mode 0600 and never printed. Files are written durably (temp file and
its directory fsync'ed around the rename), and :func:`locked` serialises
writers of one store across processes. Where these live on disk, and the
operations on them, is :mod:`broker.trust.certops`.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.trust.identity import Identity, Role

CA_DAYS = 3650
LEAF_DAYS = 30
CRL_DAYS = 7
_SKEW = timedelta(minutes=5)


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def __repr__(self) -> str:
        return f"KeyPair(serial={self.cert.serial_number:x}, key=<redacted>)"


def _name(common_name: str, district: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "yikatong"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, district),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def create_ca(district: str, now: datetime, days: int = CA_DAYS) -> KeyPair:
    """A new self-signed CA for ``district``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f"yikatong {district} CA", district)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert, key)


def issue(
    ca: KeyPair,
    ident: Identity,
    now: datetime,
    days: int = LEAF_DAYS,
    extra_dns: tuple[str, ...] = (),
) -> KeyPair:
    """Issue a leaf certificate for ``ident`` signed by ``ca``, with ``extra_dns`` SANs too.

    Raises ``ValueError`` for a wildcard name: a certificate answers for the
    names it lists and no others.
    """
    if any("*" in name for name in extra_dns):
        raise ValueError(f"no wildcard DNS names in a certificate: {extra_dns}")
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if ident.role is Role.NODE:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    sans: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(ident.spiffe_id),
        x509.DNSName(ident.dns_name),
        *(x509.DNSName(d) for d in extra_dns),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(ident.dns_name, ident.district))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return KeyPair(cert, key)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(directory: Path) -> None:
    """Create ``directory`` and missing parents (0700), each made durable in its parent."""
    if directory.is_dir():
        return
    _make_dirs(directory.parent)
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        return  # made meanwhile by another process: not ours to change
    directory.chmod(0o700)  # private keys live here: not the umask's choice
    _fsync_dir(directory.parent)


def _write_durably(path: Path, data: bytes, mode: int) -> None:
    """Temp file (``mode`` from birth), fsync, rename over ``path``, fsync the directory.

    A crash leaves the old file or the new one, never a torn or empty one, and
    once this returns the new one survives a power cut.
    """
    _make_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_private(path: Path, data: bytes) -> None:
    """Write secret bytes atomically and durably with mode 0600 (0600 from birth)."""
    _write_durably(path, data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    """Write bytes anyone may read, atomically and durably."""
    _write_durably(path, data, 0o644)


def append_line(path: Path, line: str) -> None:
    """Append one line to a log and fsync it (and its directory when the log is new)."""
    _make_dirs(path.parent)
    new = not path.exists()
    with path.open("a") as fh:
        fh.write(line.rstrip("\n") + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    if new:
        _fsync_dir(path.parent)


@dataclass
class _Hold:
    """This process's hold on one lock file: which thread, how deep, the locked descriptor."""

    thread: threading.RLock = field(default_factory=threading.RLock)
    depth: int = 0
    fd: int = -1


# flock() conflicts between two descriptors of one process too, so nested
# holds must share one descriptor: this table is what makes :func:`locked`
# re-entrant. It only ever maps a lock file to its hold.
_holds: dict[str, _Hold] = {}
_holds_guard = threading.Lock()


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created, 0600, if missing).

    Other processes (and other threads) wait until it is released; within one
    thread it is re-entrant, so an operation made of locked operations takes
    it once. ``fcntl.flock``: released by the kernel if the process dies.
    """
    key = str(path.resolve())
    with _holds_guard:
        hold = _holds.setdefault(key, _Hold())
    with hold.thread:
        if hold.depth == 0:
            _make_dirs(path.parent)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            hold.fd = fd
        hold.depth += 1
        try:
            yield
        finally:
            hold.depth -= 1
            if hold.depth == 0:
                fd, hold.fd = hold.fd, -1
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)


def save(pair: KeyPair, cert_path: Path, key_path: Path) -> None:
    """Write the key first, then the certificate, so no reader pairs a new cert with an old key."""
    write_private(key_path, pair.key_pem())
    write_public(cert_path, pair.cert_pem())


def load(cert_path: Path, key_path: Path) -> KeyPair:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path} is not an EC private key")
    return KeyPair(cert, key)


def ca_id(cert: x509.Certificate) -> str:
    """Short stable id of a CA: the first 16 hex digits of its subject key identifier."""
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return ski.digest.hex()[:16]


def build_crl(
    ca: KeyPair,
    revoked: list[tuple[int, datetime]],
    number: int,
    now: datetime,
    days: int = CRL_DAYS,
) -> x509.CertificateRevocationList:
    """A revocation list signed by ``ca`` listing ``(serial, revoked_at)`` pairs.

    The caller numbers it: ``number`` must be above that of the CA's previous
    list (:func:`crl_number`), 1 for a CA's first; readers keep the highest.
    """
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - _SKEW)
        .next_update(now + timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    for serial, when in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    return builder.sign(ca.key, hashes.SHA256())


def crl_number(crl: x509.CertificateRevocationList) -> int:
    """The CRL number :func:`build_crl` was given: each list of a CA must carry a higher one."""
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def crl_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def load_crls(data: bytes) -> list[x509.CertificateRevocationList]:
    """Every CRL in a PEM file (possibly none)."""
    marker = b"-----BEGIN X509 CRL-----"
    parts = data.split(marker)[1:]
    return [x509.load_pem_x509_crl(marker + part) for part in parts]


def crl_issuer_id(crl: x509.CertificateRevocationList) -> str:
    """The :func:`ca_id` of the CA that signed ``crl`` (from its authority key identifier)."""
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    return (aki.key_identifier or b"").hex()[:16]


def issuer_id(cert: x509.Certificate) -> str:
    """The :func:`ca_id` of the CA that issued ``cert``."""
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    return (aki.key_identifier or b"").hex()[:16]
