"""A district's certificate store on disk: where each file lives, what reads it, its lock.

Layout under ``<dir>/<district>/``::

    ca.pem                 the published trust bundle: every CA of the district trusted now
                           (one; two while a CA rotation overlaps)
    crl.pem                one revocation list per trusted CA
    cas/<id>.pem, .key     each CA and its key (0600); ``cas/active`` names the one that signs
    node.pem, node.key     the district node
    node-epoch             the node's epoch: ``current=N`` and, during a move, ``next=N+1``
                           (see :mod:`broker.trust.epochs`; absent means epoch 1)
    operators/<id>.pem, .key
    hash.key               the secret behind keyed hashes of card numbers
    settlement.key         the district's settlement signing key (Ed25519, 0600)
    bundle.json            the signed trust bundle peers fetch (see broker.trust.bundle)
    issued.jsonl           every certificate issued: serial, identity, issuing CA, validity
    .lock                  held by every operation that changes the store (:func:`store_lock`)

Every write is atomic and durable (:mod:`broker.trust.pki`) and keys are
written before their certificates; readers (:mod:`broker.trust.store`) also
refuse a key that does not match its certificate. Operations that change the
store run under :func:`store_lock`, so a timer's ``renew-due`` and an
operator's ``revoke`` never both build on the same old revocation list or
bundle sequence.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from cryptography import x509

from broker.core.errors import BrokerError, ConfigError
from broker.trust.bundle import SignedBundle
from broker.trust.identity import Identity, Role, parse_spiffe_id
from broker.trust.pki import KeyPair, ca_id, load, locked


@dataclass(frozen=True)
class DistrictPaths:
    """Where one district's material lives under a certs directory."""

    root: Path
    district: str

    @property
    def dir(self) -> Path:
        return self.root / self.district

    @property
    def ca_cert(self) -> Path:
        """The published trust bundle (every trusted CA certificate)."""
        return self.dir / "ca.pem"

    @property
    def crl(self) -> Path:
        return self.dir / "crl.pem"

    @property
    def cas(self) -> Path:
        return self.dir / "cas"

    @property
    def active_file(self) -> Path:
        return self.cas / "active"

    @property
    def node_cert(self) -> Path:
        return self.dir / "node.pem"

    @property
    def node_key(self) -> Path:
        return self.dir / "node.key"

    @property
    def epoch_file(self) -> Path:
        return self.dir / "node-epoch"

    @property
    def hash_key(self) -> Path:
        return self.dir / "hash.key"

    @property
    def issued_log(self) -> Path:
        return self.dir / "issued.jsonl"

    @property
    def settlement_key(self) -> Path:
        return self.dir / "settlement.key"

    @property
    def bundle(self) -> Path:
        return self.dir / "bundle.json"

    @property
    def lock(self) -> Path:
        return self.dir / ".lock"

    def ca_files(self, ident: str) -> tuple[Path, Path]:
        return self.cas / f"{ident}.pem", self.cas / f"{ident}.key"

    def operator_cert(self, operator_id: str) -> Path:
        return self.dir / "operators" / f"{operator_id}.pem"

    def operator_key(self, operator_id: str) -> Path:
        return self.dir / "operators" / f"{operator_id}.key"

    def admin_cert(self, admin_id: str) -> Path:
        return self.dir / "admins" / f"{admin_id}.pem"

    def admin_key(self, admin_id: str) -> Path:
        return self.dir / "admins" / f"{admin_id}.key"

    def leaf_files(self, ident: Identity) -> tuple[Path, Path]:
        if ident.role is Role.NODE:
            return self.node_cert, self.node_key
        if ident.role is Role.ADMIN:
            return self.admin_cert(ident.operator_id), self.admin_key(ident.operator_id)
        return self.operator_cert(ident.operator_id), self.operator_key(ident.operator_id)


class CertOpsError(ConfigError):
    """An operation on the certificate store cannot be done as asked (part of the error tree)."""


@contextmanager
def store_lock(paths: DistrictPaths, *, create: bool = False) -> Iterator[None]:
    """Hold the district's store lock (``<d>/.lock``) for one whole operation.

    Re-entrant within a thread: an operation built of locked operations takes
    it once. Without ``create`` (only ``init-ca`` creates a district), a
    district with no directory is an error rather than a new empty directory.
    """
    if not create and not paths.dir.is_dir():
        raise CertOpsError(f"no CA for district {paths.district} under {paths.root}")
    with locked(paths.lock):
        yield


@dataclass(frozen=True)
class IssuedEntry:
    """One line of the issuance log: a certificate as it was issued."""

    serial: int
    identity: Identity
    issuer: str
    not_before: str
    not_after: str

    @property
    def serial_hex(self) -> str:
        return f"{self.serial:x}"


# ----------------------------------------------------------------- CAs


def active_ca_id(paths: DistrictPaths) -> str:
    try:
        return paths.active_file.read_text().strip()
    except FileNotFoundError:
        raise CertOpsError(f"no CA for district {paths.district} under {paths.root}") from None


def load_ca(paths: DistrictPaths, ident: str) -> KeyPair:
    cert, key = paths.ca_files(ident)
    try:
        return load(cert, key)
    except FileNotFoundError:
        raise CertOpsError(f"CA {ident} of district {paths.district} has no key here") from None


def active_ca(paths: DistrictPaths) -> KeyPair:
    """The CA that signs new certificates now."""
    return load_ca(paths, active_ca_id(paths))


def trusted_ca_ids(paths: DistrictPaths) -> list[str]:
    """Ids of the CAs in the published bundle, in bundle order."""
    if not paths.ca_cert.exists():
        return []
    return [ca_id(c) for c in x509.load_pem_x509_certificates(paths.ca_cert.read_bytes())]


def read_bundle(path: Path) -> SignedBundle | None:
    return SignedBundle.from_json(path.read_bytes()) if path.exists() else None


# ----------------------------------------------------------------- leaves


def identity_of(cert: x509.Certificate) -> Identity:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)]
    return parse_spiffe_id(uris[0])


def dns_names(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.DNSName))


def leaf_certificates(paths: DistrictPaths) -> list[tuple[Identity, x509.Certificate]]:
    """The node's, every operator's and every admin's current certificate."""
    files = [
        paths.node_cert,
        *sorted((paths.dir / "operators").glob("*.pem")),
        *sorted((paths.dir / "admins").glob("*.pem")),
    ]
    out = []
    for f in files:
        if not f.exists():
            continue
        out.append(_leaf(f))
    return out


def _leaf(f: Path) -> tuple[Identity, x509.Certificate]:
    """The certificate in ``f`` and whom it names; one that does not parse, or names no
    SPIFFE identity, is an error that names the file (not a traceback)."""
    try:
        cert = x509.load_pem_x509_certificate(f.read_bytes())
        return identity_of(cert), cert
    except (ValueError, IndexError, x509.ExtensionNotFound, BrokerError) as exc:
        raise CertOpsError(f"{f} is not a certificate of this store: {exc}") from None


def current_certificate(paths: DistrictPaths, ident: Identity) -> x509.Certificate:
    """The certificate ``ident`` holds now; :class:`CertOpsError` when it has none."""
    found = [c for i, c in leaf_certificates(paths) if i == ident]
    if not found:
        raise CertOpsError(f"no certificate for {ident.spiffe_id}: issue one first")
    return found[0]


def lifetime_days(cert: x509.Certificate) -> int:
    span = cert.not_valid_after_utc - cert.not_valid_before_utc - timedelta(minutes=5)
    return max(1, round(span / timedelta(days=1)))
