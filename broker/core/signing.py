"""Every signed document, in one place: how it is encoded, signed, verified and parsed.

Five kinds of document cross district boundaries signed: trust bundles (signed
by a district CA, ECDSA P-256), and fare publications, batch trailers,
acknowledgements and day positions (signed by the district's Ed25519
settlement key, whose public half travels in its trust bundle). All of them:

- are RFC 8785 canonical JSON (the ``rfc8785`` package), and a signature
  covers exactly the bytes sent — nothing is re-encoded before verifying;
- carry the id of the key that signed them and their purpose (``key_id``,
  ``purpose``), so a signature made for one purpose cannot be replayed as
  another, and a document cannot claim a key other than the one it names;
- are parsed strictly: duplicate keys, NaN and infinities, any non-integer
  number, and anything but an integer where an integer belongs are refused,
  with the document kind and the field named, so two parsers cannot read one
  signed document two ways.

Documents of the previous release carry neither ``key_id`` nor ``purpose``;
they are accepted, their purpose taken from the RPC they arrived on (the
caller's ``purpose``). The previous release reads the new documents too: it
ignores fields it does not know. RFC 8785 gives the same bytes as the previous
release's encoder for every document districts sign (integers, ASCII keys,
strings), so re-encoding an unchanged fare version keeps its digest.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from broker.core.errors import ConfigError, DocumentRefused

PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey
PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


class Purpose(enum.StrEnum):
    """What a signature is for; also the document kind named in errors."""

    TRUST_BUNDLE = "trust-bundle"
    FARES = "fare-publication"
    BATCH = "batch-trailer"
    ACK = "batch-acknowledgement"
    POSITION = "day-position"


# Top-level fields that must be integers when present, per kind (nested ones are
# checked by their readers, e.g. broker.fares.rules).
_INTEGERS: dict[Purpose, frozenset[str]] = {
    Purpose.TRUST_BUNDLE: frozenset({"sequence"}),
    Purpose.FARES: frozenset(),
    Purpose.BATCH: frozenset(
        {"sequence", "chunks", "lines", "claimed_fen", "gross_fen", "charged_fen"}
        | {"concession_fen"}
    ),
    Purpose.ACK: frozenset(
        {"sequence", "lines", "accepted", "rejected", "cap_exceeded", "claimed_fen"}
        | {"accepted_claim_fen", "verdict_chunks"}
    ),
    Purpose.POSITION: frozenset({"receivable_fen", "payable_fen"}),
}


# --------------------------------------------------------------------------- encoding


def canonical(doc: Mapping[str, Any]) -> bytes:
    """RFC 8785 canonical JSON of ``doc`` (integers only: no float is ever signed)."""
    _no_floats(doc, "document")
    try:
        return rfc8785.dumps(dict(doc))
    except rfc8785.CanonicalizationError as exc:
        raise ValueError(f"document cannot be canonicalised: {exc}") from exc


def _no_floats(value: Any, where: str) -> None:
    if isinstance(value, float):
        raise ValueError(f"{where} is a float; signed documents hold integers only")
    if isinstance(value, Mapping):
        for k, v in value.items():
            _no_floats(v, f"{where}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _no_floats(v, f"{where}[{i}]")


# --------------------------------------------------------------------------- strict parsing


_SAFE = 2**53 - 1  # I-JSON (RFC 7493): integers every parser reads exactly


class _NotAnInteger:
    """A parsed number that is not an integer (or NaN/Infinity), kept to name its field."""

    def __init__(self, text: str) -> None:
        self.text = text


class Content(dict[str, Any]):
    """A parsed signed document, with typed readers that name the kind and field on refusal."""

    kind: str = "document"

    def _refuse(self, field: str, what: str) -> DocumentRefused:
        return DocumentRefused(f"{self.kind} document: field {field!r} {what}")

    def integer(self, field: str) -> int:
        value = self.get(field)
        if value is None:
            raise self._refuse(field, "is required")
        if type(value) is not int:
            raise self._refuse(field, f"must be an integer, not {type(value).__name__}")
        return value

    def text(self, field: str) -> str:
        value = self.get(field)
        if value is None:
            raise self._refuse(field, "is required")
        if not isinstance(value, str):
            raise self._refuse(field, f"must be a string, not {type(value).__name__}")
        return value

    def flag(self, field: str) -> bool:
        value = self.get(field)
        if not isinstance(value, bool):
            raise self._refuse(field, "must be true or false")
        return value

    def array(self, field: str) -> list[Any]:
        value = self.get(field)
        if not isinstance(value, list):
            raise self._refuse(field, "must be a list")
        return value


def parse(data: bytes | str, kind: str) -> Content:
    """Parse a JSON object strictly; :class:`DocumentRefused` naming ``kind`` and the field."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise DocumentRefused(f"{kind} document: field {key!r} appears twice")
            out[key] = value
        return out

    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(
            text,
            object_pairs_hook=pairs,
            parse_float=_NotAnInteger,
            parse_constant=_NotAnInteger,
        )
    except UnicodeDecodeError:
        raise DocumentRefused(f"{kind} document is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise DocumentRefused(f"{kind} document is not JSON: {exc.msg} at {exc.pos}") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python will read
        raise DocumentRefused(f"{kind} document is not acceptable JSON: {exc}") from None
    except RecursionError:
        raise DocumentRefused(f"{kind} document is nested too deeply") from None
    if not isinstance(value, dict):
        raise DocumentRefused(f"{kind} document is not a JSON object")
    _exact_values_only(value, kind, "")
    content = Content(value)
    content.kind = kind
    return content


def _exact_values_only(value: Any, kind: str, where: str) -> None:
    """Refuse what RFC 8785 cannot encode, so a document reads one way in every parser."""
    if isinstance(value, _NotAnInteger):
        raise DocumentRefused(
            f"{kind} document: field {where or 'document'!r} is {value.text}, not an integer"
        )
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _SAFE:
        raise DocumentRefused(
            f"{kind} document: field {where or 'document'!r} is beyond ±(2**53 - 1), "
            "which not every JSON parser reads exactly"
        )
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise DocumentRefused(
                f"{kind} document: field {where or 'document'!r} holds a lone surrogate"
            ) from None
    if isinstance(value, dict):
        for k, v in value.items():
            _exact_values_only(k, kind, f"{where}.<key>" if where else "<key>")
            _exact_values_only(v, kind, f"{where}.{k}" if where else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _exact_values_only(v, kind, f"{where}[{i}]")


# --------------------------------------------------------------------------- signing


def key_id(public: ed25519.Ed25519PublicKey) -> str:
    """A settlement key's id: the first 16 hex digits of SHA-256 over the raw public key."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class Signed:
    """A signed document as sent and stored: exact bytes, signing key id, signature."""

    document: bytes
    key_id: str
    signature: bytes

    def content(self) -> Content:
        """The document parsed strictly, unverified (only trust it after :func:`verify`)."""
        return parse(self.document, "signed")

    def to_file(self, key_field: str = "key_id") -> bytes:
        """The envelope as a JSON file (how a district's bundle file is written)."""
        return json.dumps(
            {
                "document": self.document.decode(),
                key_field: self.key_id,
                "signature": base64.b64encode(self.signature).decode(),
            },
            indent=1,
        ).encode()

    @staticmethod
    def from_file(data: bytes, key_field: str = "key_id", kind: str = "signed") -> Signed:
        raw = parse(data, f"{kind} file")
        document, kid, text = raw.text("document"), raw.text(key_field), raw.text("signature")
        try:
            signature = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise DocumentRefused(f"{kind} file: field 'signature' is not base64") from exc
        return Signed(document.encode(), kid, signature)


class Signer:
    """A signing key with its id: a district's settlement key, or a CA signing its bundle."""

    def __init__(self, key: PrivateKey, kid: str | None = None) -> None:
        if kid is None:
            if not isinstance(key, ed25519.Ed25519PrivateKey):
                raise ValueError("only an Ed25519 key's id can be derived; pass the key id")
            kid = key_id(key.public_key())
        self._key = key
        self.key_id = kid

    @staticmethod
    def from_file(path: Path) -> Signer:
        """The district's settlement key (an unencrypted Ed25519 PEM)."""
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"settlement key {path} cannot be read: {exc}") from exc
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ConfigError(f"settlement key {path} is not an Ed25519 key")
        return Signer(key)

    def sign(self, doc: Mapping[str, Any], purpose: Purpose) -> Signed:
        """Sign ``doc`` for ``purpose``; the document names the key and the purpose."""
        data = canonical({**doc, "key_id": self.key_id, "purpose": purpose.value})
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            return Signed(data, self.key_id, self._key.sign(data))
        return Signed(data, self.key_id, self._key.sign(data, ec.ECDSA(hashes.SHA256())))

    def public_keys(self) -> dict[str, PublicKey]:
        return {self.key_id: self._key.public_key()}


def public_key_pems(keys: Mapping[str, PublicKey]) -> tuple[tuple[str, str], ...]:
    """Verification keys as ``(key id, PEM)`` pairs (the inverse of :func:`parse_public_keys`)."""
    return tuple(
        (
            kid,
            key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ).decode(),
        )
        for kid, key in sorted(keys.items())
    )


def parse_public_keys(pairs: tuple[tuple[str, str], ...]) -> dict[str, PublicKey]:
    """``(key id, PEM)`` pairs from a trust bundle, as verification keys."""
    out: dict[str, PublicKey] = {}
    for kid, pem in pairs:
        key = serialization.load_pem_public_key(pem.encode())
        if isinstance(key, ed25519.Ed25519PublicKey) and key_id(key) == kid:
            out[kid] = key
    return out


def verify(signed: Signed, keys: Mapping[str, PublicKey], purpose: Purpose) -> Content:
    """The document's content if it is signed by the named key for ``purpose``, else refused.

    The signature is checked over the bytes as received, before they are
    parsed; then the document's own ``key_id`` and ``purpose``, when present,
    must agree with the envelope and the caller.
    """
    key = keys.get(signed.key_id)
    if key is None:
        raise DocumentRefused(
            f"{purpose} document is signed with key {signed.key_id!r}, which is not trusted"
        )
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signed.signature, signed.document)
        else:
            key.verify(signed.signature, signed.document, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise DocumentRefused(f"{purpose} document: signature does not verify") from None
    content = parse(signed.document, purpose.value)
    if content.get("purpose", purpose.value) != purpose.value:
        raise DocumentRefused(
            f"{purpose} document: field 'purpose' is {content.get('purpose')!r}, "
            f"not {purpose.value!r}"
        )
    if content.get("key_id", signed.key_id) != signed.key_id:
        raise DocumentRefused(
            f"{purpose} document: field 'key_id' does not name the key that signed it"
        )
    for field in _INTEGERS[purpose]:
        if field in content:
            content.integer(field)
    return content


def unsigned_body(content: Mapping[str, Any]) -> dict[str, Any]:
    """A document without the signing fields (what a bundle or fare version holds)."""
    return {k: v for k, v in content.items() if k not in ("key_id", "purpose")}
