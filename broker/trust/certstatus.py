"""What ``certs status`` reports: every CA and certificate with its time left and state.

By default the CAs trusted now and the certificates held now (one per node or
operator). With the issuance log (``--all``), every certificate the district
ever issued is listed too: one that was replaced stays valid until it expires
unless it is revoked, and this is where such a certificate is seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime

from cryptography import x509

from broker.trust.certstore import (
    DistrictPaths,
    IssuedEntry,
    active_ca_id,
    leaf_certificates,
    trusted_ca_ids,
)
from broker.trust.crls import revoked_serials
from broker.trust.pki import issuer_id


@dataclass(frozen=True)
class CertStatus:
    """One certificate as ``certs status`` reports it.

    Attributes:
        current: held now (a CA in the bundle, or the certificate in a node's or
            operator's file); ``False`` for one replaced since (``--all`` only).
        issuer_trusted: its CA is still in the district's bundle; a certificate
            of a retired CA is accepted nowhere.
    """

    kind: str
    subject: str
    serial: str
    issuer: str
    not_after: str
    seconds_left: int
    fraction_left: float
    revoked: bool
    active: bool
    current: bool = True
    issuer_trusted: bool = True

    @property
    def expired(self) -> bool:
        return self.seconds_left <= 0

    @property
    def warning(self) -> str:
        if not self.current:
            return self._replaced_warning()
        if self.expired:
            return "EXPIRED"
        if self.revoked:
            return "revoked"
        if self.fraction_left < 1 / 3:
            return "RENEW NOW: under a third of its lifetime left"
        if self.fraction_left < 1 / 2:
            return "due for renewal (renew-due will renew it)"
        return ""

    def _replaced_warning(self) -> str:
        if self.revoked:
            return "revoked"
        if not self.issuer_trusted:
            return "replaced; its CA is retired"
        if self.expired:
            return "replaced, expired"
        return "replaced, still valid until it expires"

    @property
    def failing(self) -> bool:
        """What makes ``certs status`` exit non-zero (only certificates held now)."""
        return self.current and (self.expired or self.fraction_left < 1 / 3)

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "warning": self.warning}


def _row(
    kind: str,
    subject: str,
    serial: int,
    issuer: str,
    validity: tuple[datetime, datetime],
    now: datetime,
) -> CertStatus:
    not_before, not_after = validity
    total = (not_after - not_before).total_seconds()
    left = (not_after - now).total_seconds()
    return CertStatus(
        kind=kind,
        subject=subject,
        serial=f"{serial:x}",
        issuer=issuer,
        not_after=not_after.isoformat(),
        seconds_left=int(left),
        fraction_left=round(max(0.0, left / total), 4),
        revoked=False,
        active=False,
    )


def _validity(cert: x509.Certificate) -> tuple[datetime, datetime]:
    return cert.not_valid_before_utc, cert.not_valid_after_utc


def leaf_statuses(paths: DistrictPaths, now: datetime) -> list[CertStatus]:
    """The node's and every operator's certificate held now."""
    revoked = revoked_serials(paths)
    trusted = set(trusted_ca_ids(paths))
    out = []
    for ident, cert in leaf_certificates(paths):
        issuer = issuer_id(cert)
        row = _row(
            ident.role.value, ident.spiffe_id, cert.serial_number, issuer, _validity(cert), now
        )
        out.append(
            _with(row, revoked=(issuer, cert.serial_number) in revoked, trusted=issuer in trusted)
        )
    return out


def _with(row: CertStatus, *, revoked: bool, trusted: bool, current: bool = True) -> CertStatus:
    return CertStatus(
        **{**asdict(row), "revoked": revoked, "issuer_trusted": trusted, "current": current}
    )


def replaced_statuses(
    paths: DistrictPaths, issued: Sequence[IssuedEntry], now: datetime
) -> list[CertStatus]:
    """Every issued certificate that is no longer held, oldest first."""
    held = {cert.serial_number for _, cert in leaf_certificates(paths)}
    revoked = revoked_serials(paths)
    trusted = set(trusted_ca_ids(paths))
    out = []
    for e in issued:
        if e.serial in held:
            continue
        validity = (datetime.fromisoformat(e.not_before), datetime.fromisoformat(e.not_after))
        row = _row(e.identity.role.value, e.identity.spiffe_id, e.serial, e.issuer, validity, now)
        out.append(
            _with(
                row,
                revoked=(e.issuer, e.serial) in revoked,
                trusted=e.issuer in trusted,
                current=False,
            )
        )
    return out


def ca_statuses(paths: DistrictPaths, now: datetime) -> list[CertStatus]:
    """Every CA in the district's bundle; ``active`` marks the one that signs."""
    active = active_ca_id(paths)
    out = []
    for i in trusted_ca_ids(paths):
        cert = x509.load_pem_x509_certificate(paths.ca_files(i)[0].read_bytes())
        row = _row("ca", cert.subject.rfc4514_string(), cert.serial_number, i, _validity(cert), now)
        out.append(CertStatus(**{**asdict(row), "active": i == active}))
    return out


def status(
    paths: DistrictPaths, now: datetime, issued: Sequence[IssuedEntry] = ()
) -> list[CertStatus]:
    """Every trusted CA and every certificate held now; with ``issued``, replaced ones too."""
    return (
        ca_statuses(paths, now) + leaf_statuses(paths, now) + replaced_statuses(paths, issued, now)
    )
