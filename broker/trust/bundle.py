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

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from broker.trust.pki import KeyPair, ca_id


class BundleRefused(Exception):
    """A bundle that must not be accepted; the reason says why."""


@dataclass(frozen=True)
class Bundle:
    """The content of a district's trust bundle."""

    district: str
    sequence: int
    issued_at: str
    cas_pem: tuple[str, ...]
    crls_pem: tuple[str, ...]
    settlement_keys: tuple[tuple[str, str], ...]  # (key id, public key PEM)

    def document(self) -> bytes:
        """The canonical bytes that are signed and sent."""
        return json.dumps(
            {
                "district": self.district,
                "sequence": self.sequence,
                "issued_at": self.issued_at,
                "cas": list(self.cas_pem),
                "crls": list(self.crls_pem),
                "settlement_keys": [{"kid": k, "public_key": p} for k, p in self.settlement_keys],
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()

    def same_content(self, other: Bundle) -> bool:
        """Equal apart from sequence and time."""
        return (self.district, self.cas_pem, self.crls_pem, self.settlement_keys) == (
            other.district,
            other.cas_pem,
            other.crls_pem,
            other.settlement_keys,
        )

    def cas(self) -> list[x509.Certificate]:
        return [x509.load_pem_x509_certificate(p.encode()) for p in self.cas_pem]

    @staticmethod
    def parse(document: bytes) -> Bundle:
        try:
            doc = json.loads(document)
            return Bundle(
                district=str(doc["district"]),
                sequence=int(doc["sequence"]),
                issued_at=str(doc["issued_at"]),
                cas_pem=tuple(str(c) for c in doc["cas"]),
                crls_pem=tuple(str(c) for c in doc["crls"]),
                settlement_keys=tuple(
                    (str(k["kid"]), str(k["public_key"])) for k in doc["settlement_keys"]
                ),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise BundleRefused("bundle document is malformed") from exc


@dataclass(frozen=True)
class SignedBundle:
    """A bundle document with its signature, as stored and as sent."""

    document: bytes
    signer: str
    signature: bytes

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "document": self.document.decode(),
                "signer": self.signer,
                "signature": base64.b64encode(self.signature).decode(),
            },
            indent=1,
        ).encode()

    @staticmethod
    def from_json(data: bytes) -> SignedBundle:
        try:
            raw = json.loads(data)
            return SignedBundle(
                raw["document"].encode(), str(raw["signer"]), base64.b64decode(raw["signature"])
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BundleRefused("bundle file is malformed") from exc


def sign(bundle: Bundle, ca: KeyPair) -> SignedBundle:
    document = bundle.document()
    signature = ca.key.sign(document, ec.ECDSA(hashes.SHA256()))
    return SignedBundle(document, ca_id(ca.cert), signature)


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
    anchors = list(trusted) if trusted is not None else bundle.cas()
    signer = next((c for c in anchors if ca_id(c) == signed.signer), None)
    if signer is None:
        raise BundleRefused(f"bundle signed by CA {signed.signer}, which is not trusted")
    pub = signer.public_key()
    try:
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise InvalidSignature
        pub.verify(signed.signature, signed.document, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise BundleRefused("bundle signature does not verify") from None
    if bundle.sequence <= held_sequence:
        raise BundleRefused(
            f"bundle sequence {bundle.sequence} is not above the held {held_sequence}"
        )
    return bundle


def issued_now(now: datetime) -> str:
    return now.isoformat(timespec="seconds")
