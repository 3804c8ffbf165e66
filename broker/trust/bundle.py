"""Signed trust bundles: what one district publishes so its peers can trust it.

A bundle holds the district's CA certificates, their revocation lists, its
settlement signing public keys and a sequence number that only grows. It is
canonical JSON signed by one of the district's CAs. A peer accepts a new
bundle only if it is signed by a CA it already trusts for that district and
its sequence is higher than the one it holds — so a CA rotation reaches peers
(the new CA arrives in a bundle signed by the old one before it signs
anything), and a replayed old bundle or a forged one is refused, the last
good one kept. The first bundle of a district is imported by hand
(``broker trust import``) after checking its CA fingerprint out of band.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from broker.core.errors import DocumentRefused
from broker.core.signing import (
    Content,
    PublicKey,
    Purpose,
    Signed,
    Signer,
    canonical,
    parse,
)
from broker.core.signing import verify as verify_signed
from broker.trust.config import NODE_NAME_RE
from broker.trust.pki import KeyPair, ca_id, locked, write_public


class BundleRefused(DocumentRefused):
    """A bundle that must not be accepted; the reason says why (a refused signed document)."""


@dataclass(frozen=True)
class Bundle:
    """The content of a district's trust bundle."""

    district: str
    sequence: int
    issued_at: str
    cas_pem: tuple[str, ...]
    crls_pem: tuple[str, ...]
    settlement_keys: tuple[tuple[str, str], ...]  # (key id, public key PEM)
    # The TLS server name the district's node answers as now, with its epoch
    # (``e2.node.500111.yikatong.cy``); peers pin it. ``None`` in bundles of the
    # previous release: peers then use the configured name.
    node_name: str | None = None

    def body(self) -> dict[str, Any]:
        """The bundle's fields as a document (without the signing fields)."""
        doc: dict[str, Any] = {
            "district": self.district,
            "sequence": self.sequence,
            "issued_at": self.issued_at,
            "cas": list(self.cas_pem),
            "crls": list(self.crls_pem),
            "settlement_keys": [{"kid": k, "public_key": p} for k, p in self.settlement_keys],
        }
        if self.node_name is not None:
            doc["node_name"] = self.node_name
        return doc

    def document(self) -> bytes:
        """The canonical bytes of the body (what two bundles of one sequence must share)."""
        return canonical(self.body())

    def same_content(self, other: Bundle) -> bool:
        """Equal apart from sequence and time."""
        return (
            self.district,
            self.cas_pem,
            self.crls_pem,
            self.settlement_keys,
            self.node_name,
        ) == (
            other.district,
            other.cas_pem,
            other.crls_pem,
            other.settlement_keys,
            other.node_name,
        )

    def cas(self) -> list[x509.Certificate]:
        return [x509.load_pem_x509_certificate(p.encode()) for p in self.cas_pem]

    @staticmethod
    def parse(document: bytes) -> Bundle:
        try:
            return Bundle.of(parse(document, Purpose.TRUST_BUNDLE.value))
        except DocumentRefused as exc:
            raise BundleRefused(f"bundle document is malformed: {exc}") from exc

    @staticmethod
    def of(doc: Content) -> Bundle:
        """The bundle a parsed, verified document holds."""
        keys = []
        for i, entry in enumerate(doc.array("settlement_keys")):
            if not isinstance(entry, dict):
                raise DocumentRefused(f"{doc.kind} document: settlement_keys[{i}] is not an object")
            pair = (entry.get("kid"), entry.get("public_key"))
            if not all(isinstance(v, str) for v in pair):
                raise DocumentRefused(
                    f"{doc.kind} document: settlement_keys[{i}] needs string kid and public_key"
                )
            keys.append((str(pair[0]), str(pair[1])))
        return Bundle(
            district=doc.text("district"),
            sequence=doc.integer("sequence"),
            issued_at=doc.text("issued_at"),
            cas_pem=_strings(doc, "cas"),
            crls_pem=_strings(doc, "crls"),
            settlement_keys=tuple(keys),
            node_name=_node_name(doc),
        )


def _node_name(doc: Content) -> str | None:
    if "node_name" not in doc:
        return None
    name = doc.text("node_name")
    district = doc.get("district")
    if not NODE_NAME_RE.fullmatch(name) or not name.endswith(f".node.{district}.yikatong.cy"):
        raise DocumentRefused(
            f"{doc.kind} document: field 'node_name' {name!r} is not an epoch name "
            f"of district {district}'s node (e<N>.node.{district}.yikatong.cy)"
        )
    return name


def _strings(doc: Content, field: str) -> tuple[str, ...]:
    values = doc.array(field)
    if not all(isinstance(v, str) for v in values):
        raise DocumentRefused(f"{doc.kind} document: field {field!r} must hold strings")
    return tuple(values)


@dataclass(frozen=True)
class SignedBundle:
    """A bundle document with its signature, as stored and as sent."""

    document: bytes
    signer: str
    signature: bytes

    def signed(self) -> Signed:
        return Signed(self.document, self.signer, self.signature)

    def to_json(self) -> bytes:
        return self.signed().to_file(key_field="signer")

    @staticmethod
    def from_json(data: bytes) -> SignedBundle:
        try:
            s = Signed.from_file(data, key_field="signer", kind="bundle")
        except DocumentRefused as exc:
            raise BundleRefused(f"bundle file is malformed: {exc}") from exc
        return SignedBundle(s.document, s.key_id, s.signature)


def sign(bundle: Bundle, ca: KeyPair) -> SignedBundle:
    signed = Signer(ca.key, ca_id(ca.cert)).sign(bundle.body(), Purpose.TRUST_BUNDLE)
    return SignedBundle(signed.document, signed.key_id, signed.signature)


def verify(
    signed: SignedBundle,
    district: str,
    trusted: Sequence[x509.Certificate] | None,
    held_sequence: int,
) -> Bundle:
    """Accept ``signed`` as district ``district``'s next bundle, or raise :class:`BundleRefused`.

    Args:
        trusted: the CAs already trusted for the district; ``None`` for a first
            import, where the bundle must be signed by one of its own CAs.
        held_sequence: the sequence of the bundle held now (0 if none).
    """
    bundle = Bundle.parse(signed.document)
    if bundle.district != district:
        raise BundleRefused(f"bundle is of district {bundle.district}, not {district}")
    keys: dict[str, PublicKey] = {}
    try:
        anchors = list(trusted) if trusted is not None else bundle.cas()
        for cert in anchors:
            pub = cert.public_key()
            if isinstance(pub, ec.EllipticCurvePublicKey):  # district CAs are P-256
                keys[ca_id(cert)] = pub
    except x509.ExtensionNotFound:
        raise BundleRefused(f"bundle of {district}: a CA has no Subject Key Identifier") from None
    except ValueError as exc:
        raise BundleRefused(f"bundle of {district}: a CA does not parse: {exc}") from None
    try:
        verify_signed(signed.signed(), keys, Purpose.TRUST_BUNDLE)
    except DocumentRefused as exc:
        raise BundleRefused(f"bundle refused: {exc}") from None
    if bundle.sequence <= held_sequence:
        raise BundleRefused(
            f"bundle sequence {bundle.sequence} is not above the held {held_sequence}"
        )
    return bundle


def served_path(bundle_file: Path) -> Path:
    """Where a node notes which of its bundles each peer last fetched (beside the bundle)."""
    return bundle_file.with_name(f"{bundle_file.stem}-served.txt")


def read_served(bundle_file: Path) -> dict[str, tuple[int, str]]:
    """Peer district → (sequence of the bundle it last fetched, when), as the node noted."""
    out: dict[str, tuple[int, str]] = {}
    try:
        text = served_path(bundle_file).read_text()
    except FileNotFoundError:
        return out
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleRefused(f"{served_path(bundle_file)} cannot be read: {exc}") from exc
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1].isdigit():
            out[parts[0]] = (int(parts[1]), parts[2])
    return out


def note_served(bundle_file: Path, district: str, sequence: int, at: datetime) -> None:
    """Note that ``district`` fetched bundle ``sequence`` (durably, under the store lock)."""
    with locked(bundle_file.parent / ".lock"):  # the cert store's lock (certs/<d>/.lock)
        served = read_served(bundle_file)
        served[district] = (sequence, at.isoformat(timespec="seconds"))
        lines = [f"{d} {n} {t}\n" for d, (n, t) in sorted(served.items())]
        write_public(served_path(bundle_file), "".join(lines).encode())


def issued_now(now: datetime) -> str:
    return now.isoformat(timespec="seconds")
