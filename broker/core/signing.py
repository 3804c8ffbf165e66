"""Signed settlement documents: canonical JSON, an Ed25519 signature, a key id.

The settlement key is separate from the TLS key; its public half travels in
the district's trust bundle (``settlement_keys``), named by a key id (the
first 16 hex digits of SHA-256 over the raw public key). A signature covers
exactly the bytes sent.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from broker.core.errors import ConfigError, DocumentRefused


def canonical(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def key_id(public: ed25519.Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class Signed:
    document: bytes
    key_id: str
    signature: bytes

    def content(self) -> dict[str, Any]:
        """The document parsed (only call after :func:`verify`)."""
        value = json.loads(self.document)
        if not isinstance(value, dict):
            raise DocumentRefused("document is not a JSON object")
        return value


class Signer:
    """A district's settlement signing key."""

    def __init__(self, key: ed25519.Ed25519PrivateKey) -> None:
        self._key = key
        self.key_id = key_id(key.public_key())

    @staticmethod
    def from_file(path: Path) -> Signer:
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"settlement key {path} cannot be read") from exc
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ConfigError(f"settlement key {path} is not an Ed25519 key")
        return Signer(key)

    def sign(self, doc: Mapping[str, Any]) -> Signed:
        data = canonical(doc)
        return Signed(data, self.key_id, self._key.sign(data))

    def public_keys(self) -> dict[str, ed25519.Ed25519PublicKey]:
        return {self.key_id: self._key.public_key()}


def parse_public_keys(pairs: tuple[tuple[str, str], ...]) -> dict[str, ed25519.Ed25519PublicKey]:
    """``(key id, PEM)`` pairs from a trust bundle, as verification keys."""
    out: dict[str, ed25519.Ed25519PublicKey] = {}
    for kid, pem in pairs:
        key = serialization.load_pem_public_key(pem.encode())
        if isinstance(key, ed25519.Ed25519PublicKey) and key_id(key) == kid:
            out[kid] = key
    return out


def verify(signed: Signed, keys: Mapping[str, ed25519.Ed25519PublicKey]) -> dict[str, Any]:
    """The document's content if its signature verifies under the named key, else refused."""
    key = keys.get(signed.key_id)
    if key is None:
        raise DocumentRefused(f"signed with key {signed.key_id!r}, which is not in the bundle")
    try:
        key.verify(signed.signature, signed.document)
    except InvalidSignature:
        raise DocumentRefused("signature does not verify") from None
    return signed.content()
