"""Revocation lists that only move forward: what is revoked stays refused.

A district's revocation lists (one per CA, in a ``crl.pem`` or inside its
trust bundle) are judged here before they take effect:

- every list must parse, name its CA (Authority Key Identifier), be signed by
  one of the district's trust anchors and carry a CRL number;
- a list replaces the one in force for its CA only if its number is higher,
  or equal with identical content — an older file put back (a restore, a
  copy in progress, ``rsync`` of a stale tree) is refused;
- the highest number accepted per CA is written to a small state file, so a
  restart does not forget it (:class:`Watermarks`).

Anything else — a missing, empty, PEM-less or unparsable file, a list of an
unknown CA — is a problem reported to the caller, which keeps the last good
set (:mod:`broker.trust.store`). Nothing here ever lets a revocation go.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from broker.core.errors import ConfigError
from broker.trust.pki import ca_id, write_public

log = structlog.get_logger(__name__)

_MARKER = b"-----BEGIN X509 CRL-----"


@dataclass(frozen=True)
class AcceptedCrl:
    """One CA's revocation list as it is in force."""

    issuer: str  # the CA's ca_id
    number: int
    sha256: str
    serials: frozenset[int]
    next_update: datetime | None


def parse_crls(
    data: bytes, source: str, district: str, anchors: Sequence[x509.Certificate]
) -> dict[str, AcceptedCrl]:
    """Every list in ``data``, checked against ``anchors``; :class:`ConfigError` names the fault.

    Two lists of one CA in one file: the higher number counts.
    """
    if _MARKER not in data:
        raise ConfigError(f"{source} holds no revocation list")
    by_id: dict[str, x509.Certificate] = {}
    for cert in anchors:
        try:
            by_id[ca_id(cert)] = cert
        except x509.ExtensionNotFound:
            raise ConfigError(
                f"a CA of district {district} has no Subject Key Identifier"
            ) from None
    out: dict[str, AcceptedCrl] = {}
    for i, part in enumerate(data.split(_MARKER)[1:]):
        crl = _load(_MARKER + part, f"{source} (list {i + 1})")
        accepted = _check(crl, f"{source} (list {i + 1})", district, by_id)
        held = out.get(accepted.issuer)
        if held is None or accepted.number > held.number:
            out[accepted.issuer] = accepted
    return out


def _load(pem: bytes, where: str) -> x509.CertificateRevocationList:
    try:
        return x509.load_pem_x509_crl(pem)
    except ValueError as exc:
        raise ConfigError(f"{where} does not parse: {exc}") from None


def _check(
    crl: x509.CertificateRevocationList,
    where: str,
    district: str,
    by_id: Mapping[str, x509.Certificate],
) -> AcceptedCrl:
    try:
        aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound as exc:
        raise ConfigError(f"{where} lacks its {exc.oid._name}") from None
    issuer = (aki.key_identifier or b"").hex()[:16]
    ca = by_id.get(issuer)
    if ca is None:
        raise ConfigError(
            f"{where} is signed by CA {issuer or '?'}, which is not a trust anchor of {district}"
        )
    pub = ca.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(pub):
        raise ConfigError(f"{where} is not signed by CA {issuer}")
    return AcceptedCrl(
        issuer=issuer,
        number=int(number),
        sha256=hashlib.sha256(crl.public_bytes(Encoding.DER)).hexdigest(),
        serials=frozenset(r.serial_number for r in crl),
        next_update=crl.next_update_utc,
    )


class Watermarks:
    """The highest CRL number accepted per district and CA, kept in a file across restarts.

    ``path`` ``None`` keeps them in memory only (a test, or a node that has
    nowhere to write).
    """

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._marks: dict[str, tuple[int, str]] = {}
        if path is not None and path.exists():
            self._marks = _read_marks(path)

    def admits(self, district: str, crl: AcceptedCrl) -> str | None:
        """Why ``crl`` may not replace what is in force (``None``: it may)."""
        held = self._marks.get(f"{district}/{crl.issuer}")
        if held is None or crl.number > held[0]:
            return None
        if crl.number == held[0] and crl.sha256 == held[1]:
            return None
        if crl.number == held[0]:
            return (
                f"revocation list {crl.number} of CA {crl.issuer} ({district}) differs from "
                "the one accepted under that number"
            )
        return (
            f"revocation list {crl.number} of CA {crl.issuer} ({district}) is older than "
            f"number {held[0]}, already accepted"
        )

    def bundle_admits(self, district: str, sequence: int, digest: str) -> str | None:
        """Why a bundle of ``district`` may not replace the one in force (``None``: it may).

        A bundle file put back older (a restore, a stale copy) would bring back
        CAs, settlement keys and a pinned node name the district has moved on
        from: its sequence must not be below the highest accepted, and the same
        sequence must be the same document.
        """
        held = self._marks.get(f"{district}/bundle")
        if held is None or sequence > held[0] or (sequence, digest) == held:
            return None
        if sequence == held[0]:
            return f"bundle {sequence} of {district} differs from the one accepted under it"
        return f"bundle {sequence} of {district} is older than {held[0]}, already accepted"

    def record(
        self,
        district: str,
        crls: Mapping[str, AcceptedCrl],
        bundle: tuple[int, str] | None = None,
    ) -> None:
        """Raise the marks to ``crls`` (and the bundle's sequence); written out when one moved.

        The file is written before the marks move in memory: if the write fails
        (disk full, read-only), the next call tries again, and the caller hears
        of it (OSError) rather than a restart forgetting the marks.
        """
        marks = dict(self._marks)
        for crl in crls.values():
            key = f"{district}/{crl.issuer}"
            if marks.get(key, (-1, ""))[0] < crl.number:
                marks[key] = (crl.number, crl.sha256)
        if bundle is not None and marks.get(f"{district}/bundle", (-1, ""))[0] < bundle[0]:
            marks[f"{district}/bundle"] = bundle
        if marks == self._marks:
            return
        if self._path is not None:
            lines = [f"{k} {n} {h}\n" for k, (n, h) in sorted(marks.items())]
            write_public(self._path, ("".join(lines)).encode())
        self._marks = marks


def _read_marks(path: Path) -> dict[str, tuple[int, str]]:
    """The marks file (``<district>/<ca id> <number> <sha256>`` per line), or ConfigError.

    A node must not start having forgotten them: a file it cannot read stops it.
    """
    marks: dict[str, tuple[int, str]] = {}
    try:
        for line in path.read_text().splitlines():
            if line.strip():
                key, number, digest = line.split()
                marks[key] = (int(number), digest)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"revocation state {path} cannot be read: {exc}") from exc
    return marks
