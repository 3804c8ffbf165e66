"""A district's certificates on disk, and the operations staff run on them.

Layout under ``<dir>/<district>/``::

    ca.pem                 the published trust bundle: every CA of the district trusted now
                           (one; two while a CA rotation overlaps)
    crl.pem                one revocation list per trusted CA
    cas/<id>.pem, .key     each CA and its key (0600); ``cas/active`` names the one that signs
    node.pem, node.key     the district node
    operators/<id>.pem, .key
    hash.key               the secret behind keyed hashes of card numbers
    settlement.key         the district's settlement signing key (Ed25519, 0600)
    bundle.json            the signed trust bundle peers fetch (see broker.trust.bundle)
    issued.jsonl           every certificate issued: serial, identity, issuing CA, validity

Every write is atomic (temp file, then rename) and keys are written before
their certificates; readers (:mod:`broker.trust.store`) also refuse a key that does
not match its certificate, so no reader pairs a new certificate with an old key.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from broker.trust.bundle import Bundle, SignedBundle, issued_now, sign
from broker.trust.identity import Identity, Role, parse_spiffe_id
from broker.trust.pki import (
    CA_DAYS,
    LEAF_DAYS,
    KeyPair,
    build_crl,
    ca_id,
    create_ca,
    crl_issuer_id,
    crl_pem,
    issue,
    issuer_id,
    load,
    load_crls,
    save,
    write_private,
    write_public,
)


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

    def ca_files(self, ident: str) -> tuple[Path, Path]:
        return self.cas / f"{ident}.pem", self.cas / f"{ident}.key"

    def operator_cert(self, operator_id: str) -> Path:
        return self.dir / "operators" / f"{operator_id}.pem"

    def operator_key(self, operator_id: str) -> Path:
        return self.dir / "operators" / f"{operator_id}.key"

    def leaf_files(self, ident: Identity) -> tuple[Path, Path]:
        if ident.role is Role.NODE:
            return self.node_cert, self.node_key
        return self.operator_cert(ident.operator_id), self.operator_key(ident.operator_id)


class CertOpsError(Exception):
    """An operation on the certificate store cannot be done as asked."""


# ----------------------------------------------------------------- CAs and bundle


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


def _publish(paths: DistrictPaths, ids: list[str], now: datetime) -> None:
    """Write the trust bundle and the revocation lists for exactly the CAs ``ids``."""
    bundle = b"".join(paths.ca_files(i)[0].read_bytes() for i in ids)
    old = {}
    if paths.crl.exists():
        old = {crl_issuer_id(c): c for c in load_crls(paths.crl.read_bytes())}
    crls = []
    for i in ids:
        crl = old.get(i)
        if crl is None:
            crl = build_crl(load_ca(paths, i), [], 1, now)
        crls.append(crl_pem(crl))
    # Revocations first, then the bundle: a reader never trusts a CA without its list.
    write_public(paths.crl, b"".join(crls))
    write_public(paths.ca_cert, bundle)
    publish_bundle(paths, now)


def init_ca(paths: DistrictPaths, now: datetime, days: int = CA_DAYS) -> KeyPair:
    """Create the district's first CA, its empty revocation list and its bundle."""
    if paths.active_file.exists():
        raise CertOpsError(f"district {paths.district} already has a CA under {paths.root}")
    ca = create_ca(paths.district, now, days)
    ident = ca_id(ca.cert)
    save(ca, *paths.ca_files(ident))
    write_public(paths.active_file, ident.encode())
    if not paths.settlement_key.exists():
        key = ed25519.Ed25519PrivateKey.generate()
        write_private(
            paths.settlement_key,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
    _publish(paths, [ident], now)
    return ca


def settlement_public_keys(paths: DistrictPaths) -> tuple[tuple[str, str], ...]:
    """``(key id, public key PEM)`` of the district's settlement signing key, if it has one."""
    if not paths.settlement_key.exists():
        return ()
    key = serialization.load_pem_private_key(paths.settlement_key.read_bytes(), password=None)
    pub = key.public_key()
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    pem = pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return ((hashlib.sha256(raw).hexdigest()[:16], pem.decode()),)


def read_bundle(path: Path) -> SignedBundle | None:
    return SignedBundle.from_json(path.read_bytes()) if path.exists() else None


def publish_bundle(paths: DistrictPaths, now: datetime) -> SignedBundle:
    """Sign and write the district's trust bundle; the sequence grows when the content changes."""
    cas = tuple(
        c.public_bytes(serialization.Encoding.PEM).decode()
        for c in x509.load_pem_x509_certificates(paths.ca_cert.read_bytes())
    )
    crls = tuple(crl_pem(c).decode() for c in load_crls(paths.crl.read_bytes()))
    held = read_bundle(paths.bundle)
    previous = Bundle.parse(held.document) if held is not None else None
    draft = Bundle(paths.district, 1, issued_now(now), cas, crls, settlement_public_keys(paths))
    if previous is not None and held is not None and previous.same_content(draft):
        return held
    if previous is not None:
        draft = replace(draft, sequence=previous.sequence + 1)
    signed = sign(draft, active_ca(paths))
    write_public(paths.bundle, signed.to_json())
    return signed


class RotationStage(enum.StrEnum):
    PUBLISH = "publish"  # new CA created and published; the old one still signs
    ACTIVATE = "activate"  # the new CA signs; node and operators re-issued by it
    RETIRE = "retire"  # the old CA leaves the bundle; its key is destroyed


def rotate_ca(paths: DistrictPaths, stage: RotationStage, now: datetime) -> str:
    """One stage of a CA rotation; returns what it did, for the operator.

    ``publish`` must reach every peer (bundle refresh) before ``activate``;
    every certificate of the old CA must be replaced before ``retire``.
    """
    trusted = trusted_ca_ids(paths)
    active = active_ca_id(paths)
    if stage is RotationStage.PUBLISH:
        if len(trusted) > 1:
            raise CertOpsError("a rotation is already under way: activate or retire it first")
        new = create_ca(paths.district, now)
        ident = ca_id(new.cert)
        save(new, *paths.ca_files(ident))
        _publish(paths, [*trusted, ident], now)
        return f"CA {ident} published beside {active}; {active} still signs"
    if stage is RotationStage.ACTIVATE:
        pending = [i for i in trusted if i != active]
        if not pending:
            raise CertOpsError("no published CA to activate: run publish first")
        write_public(paths.active_file, pending[0].encode())
        renewed = [str(p) for p in reissue_all(paths, now)]
        return f"CA {pending[0]} now signs; re-issued {len(renewed)} certificate(s)"
    old = [i for i in trusted if i != active]
    if not old:
        raise CertOpsError("nothing to retire: only the active CA is trusted")
    if trusted[-1] != active:
        raise CertOpsError("the published CA does not sign yet: run activate first")
    still = [s for s in leaf_statuses(paths, now) if s.issuer in old and not s.expired]
    if still:
        raise CertOpsError(
            f"{len(still)} certificate(s) still issued by the old CA: run activate/renew first"
        )
    _publish(paths, [active], now)
    for i in old:
        paths.ca_files(i)[1].unlink(missing_ok=True)  # the retired key is destroyed
    return f"CA {', '.join(old)} retired; only {active} is trusted"


# ----------------------------------------------------------------- leaves


def _log_issued(paths: DistrictPaths, cert: x509.Certificate, ident: Identity, issuer: str) -> None:
    entry = {
        "serial": f"{cert.serial_number:x}",
        "identity": ident.spiffe_id,
        "issuer": issuer,
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
    }
    with paths.issued_log.open("a") as fh:
        fh.write(json.dumps(entry) + "\n")


def issue_to_files(
    paths: DistrictPaths, ident: Identity, now: datetime, days: int = LEAF_DAYS
) -> tuple[Path, Path]:
    """Issue (or replace) a node or operator certificate with the active CA; return (cert, key)."""
    if ident.district != paths.district:
        raise CertOpsError(f"{ident.spiffe_id} is not of district {paths.district}")
    ca = active_ca(paths)
    pair = issue(ca, ident, now, days)
    cert_path, key_path = paths.leaf_files(ident)
    save(pair, cert_path, key_path)
    _log_issued(paths, pair.cert, ident, ca_id(ca.cert))
    return cert_path, key_path


def leaf_certificates(paths: DistrictPaths) -> list[tuple[Identity, x509.Certificate]]:
    """The node's and every operator's current certificate."""
    files = [paths.node_cert, *sorted((paths.dir / "operators").glob("*.pem"))]
    out = []
    for f in files:
        if not f.exists():
            continue
        cert = x509.load_pem_x509_certificate(f.read_bytes())
        out.append((identity_of(cert), cert))
    return out


def identity_of(cert: x509.Certificate) -> Identity:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)]
    return parse_spiffe_id(uris[0])


def lifetime_days(cert: x509.Certificate) -> int:
    span = cert.not_valid_after_utc - cert.not_valid_before_utc - timedelta(minutes=5)
    return max(1, round(span / timedelta(days=1)))


def reissue_all(paths: DistrictPaths, now: datetime) -> list[Path]:
    """Re-issue every leaf with the active CA, keeping each one's lifetime."""
    return [
        issue_to_files(paths, ident, now, lifetime_days(cert))[0]
        for ident, cert in leaf_certificates(paths)
    ]


def renew_due(paths: DistrictPaths, now: datetime) -> list[Path]:
    """Re-issue every leaf past half its lifetime (for a timer); return the renewed files."""
    renewed = []
    for ident, cert in leaf_certificates(paths):
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        if now - cert.not_valid_before_utc >= lifetime / 2:
            renewed.append(issue_to_files(paths, ident, now, lifetime_days(cert))[0])
    return renewed


def revoke(paths: DistrictPaths, serial_hex: str, now: datetime) -> str:
    """Add a serial to the revocation list of the CA that issued it; returns that CA's id."""
    try:
        serial = int(serial_hex.lower().removeprefix("0x"), 16)
    except ValueError:
        raise CertOpsError("serial must be hexadecimal, as `certs status` prints it") from None
    issuer = None
    if paths.issued_log.exists():
        for line in paths.issued_log.read_text().splitlines():
            entry = json.loads(line)
            if int(entry["serial"], 16) == serial:
                issuer = entry["issuer"]
    if issuer is None:
        raise CertOpsError(f"serial {serial:x} was not issued by district {paths.district}")
    issuer = str(issuer)
    trusted = trusted_ca_ids(paths)
    if issuer not in trusted:
        raise CertOpsError(f"CA {issuer} is retired: its certificates are no longer trusted anyway")
    ca = load_ca(paths, issuer)
    crls = {crl_issuer_id(c): c for c in load_crls(paths.crl.read_bytes())}
    current = crls.get(issuer)
    entries = [(r.serial_number, r.revocation_date_utc) for r in current or []]
    number = 1
    if current is not None:
        number = current.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
    if serial not in {s for s, _ in entries}:
        entries.append((serial, now))
    crls[issuer] = build_crl(ca, entries, number, now)
    write_public(paths.crl, b"".join(crl_pem(crls[i]) for i in trusted if i in crls))
    publish_bundle(paths, now)
    return issuer


# ----------------------------------------------------------------- status


@dataclass(frozen=True)
class CertStatus:
    """One certificate as ``certs status`` reports it."""

    kind: str
    subject: str
    serial: str
    issuer: str
    not_after: str
    seconds_left: int
    fraction_left: float
    revoked: bool
    active: bool

    @property
    def expired(self) -> bool:
        return self.seconds_left <= 0

    @property
    def warning(self) -> str:
        if self.expired:
            return "EXPIRED"
        if self.revoked:
            return "revoked"
        if self.fraction_left < 1 / 3:
            return "RENEW NOW: under a third of its lifetime left"
        if self.fraction_left < 1 / 2:
            return "due for renewal (renew-due will renew it)"
        return ""

    @property
    def failing(self) -> bool:
        """What makes ``certs status`` exit non-zero."""
        return self.expired or self.fraction_left < 1 / 3

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "warning": self.warning}


def _status(
    kind: str,
    subject: str,
    cert: x509.Certificate,
    issuer: str,
    revoked: bool,
    active: bool,
    now: datetime,
) -> CertStatus:
    total = (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds()
    left = (cert.not_valid_after_utc - now).total_seconds()
    return CertStatus(
        kind,
        subject,
        f"{cert.serial_number:x}",
        issuer,
        cert.not_valid_after_utc.isoformat(),
        int(left),
        round(max(0.0, left / total), 4),
        revoked,
        active,
    )


def _revoked_serials(paths: DistrictPaths) -> set[tuple[str, int]]:
    if not paths.crl.exists():
        return set()
    return {
        (crl_issuer_id(c), r.serial_number) for c in load_crls(paths.crl.read_bytes()) for r in c
    }


def leaf_statuses(paths: DistrictPaths, now: datetime) -> list[CertStatus]:
    revoked = _revoked_serials(paths)
    out = []
    for ident, cert in leaf_certificates(paths):
        issuer = issuer_id(cert)
        out.append(
            _status(
                ident.role.value,
                ident.spiffe_id,
                cert,
                issuer,
                (issuer, cert.serial_number) in revoked,
                False,
                now,
            )
        )
    return out


def status(paths: DistrictPaths, now: datetime) -> list[CertStatus]:
    """Every trusted CA and every leaf certificate of the district, with time left."""
    active = active_ca_id(paths)
    cas = []
    for i in trusted_ca_ids(paths):
        cert = x509.load_pem_x509_certificate(paths.ca_files(i)[0].read_bytes())
        cas.append(_status("ca", cert.subject.rfc4514_string(), cert, i, False, i == active, now))
    return cas + leaf_statuses(paths, now)
