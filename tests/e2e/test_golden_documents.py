"""Signed documents of both formats verify, parse and re-encode byte for byte.

``tests/fixtures/documents-v0/`` holds one document of each kind that districts sign —
fare publication, batch trailer, acknowledgement, position and its reply — and each
district's signed trust bundle, as the previous release wrote them;
``documents-v1/`` the same as this release writes them, with ``key_id`` and
``purpose`` (``scripts/make-golden-documents``, run once per format). A home
district stores published fare versions by digest, so a byte changed by
re-encoding would turn the next publication of an unchanged version into
ALREADY_EXISTS: re-encoding must be exact, for both formats, forever.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from broker.core.errors import DocumentRefused
from broker.core.signing import (
    PublicKey,
    Purpose,
    Signed,
    canonical,
    parse,
    parse_public_keys,
    verify,
)
from broker.trust import bundle as bundles
from broker.trust.bundle import Bundle, SignedBundle

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FORMATS = ("documents-v0", "documents-v1")
KINDS = ("fares", "batch", "ack", "position", "position-reply")
PURPOSE = {
    "fares": Purpose.FARES,
    "batch": Purpose.BATCH,
    "ack": Purpose.ACK,
    "position": Purpose.POSITION,
    "position-reply": Purpose.POSITION,
}
DISTRICTS = ("500111", "512021", "500153")
EACH_KIND = [(f, k) for f in FORMATS for k in KINDS]
EACH_BUNDLE = [(f, d) for f in FORMATS for d in DISTRICTS]


def held_bundle(fmt: str, district: str) -> Bundle:
    signed = SignedBundle.from_json((FIXTURES / fmt / f"bundle-{district}.json").read_bytes())
    return bundles.verify(signed, district, None, 0)


def envelope(fmt: str, kind: str) -> tuple[Signed, str]:
    raw = json.loads((FIXTURES / fmt / f"{kind}.json").read_text())
    signed = Signed(raw["document"].encode(), raw["key_id"], base64.b64decode(raw["signature"]))
    return signed, raw["district"]


def keys(fmt: str, district: str) -> dict[str, PublicKey]:
    return dict(parse_public_keys(held_bundle(fmt, district).settlement_keys))


@pytest.mark.parametrize(("fmt", "kind"), EACH_KIND)
def test_each_kind_verifies_with_its_districts_bundle_key(fmt: str, kind: str):
    signed, district = envelope(fmt, kind)
    content = verify(signed, keys(fmt, district), PURPOSE[kind])
    assert content["type"] == kind.removesuffix("-reply")
    assert content.get("from", content.get("district")) == district
    if fmt == "documents-v0":
        assert "key_id" not in content and "purpose" not in content
    else:
        assert content["key_id"] == signed.key_id and content["purpose"] == PURPOSE[kind].value


@pytest.mark.parametrize(("fmt", "kind"), EACH_KIND)
def test_each_kind_re_encodes_byte_for_byte(fmt: str, kind: str):
    signed, _ = envelope(fmt, kind)
    assert canonical(parse(signed.document, kind)) == signed.document


@pytest.mark.parametrize(("fmt", "kind"), EACH_KIND)
def test_a_golden_document_with_one_byte_changed_is_refused(fmt: str, kind: str):
    """The fixtures are real signatures: the test above cannot pass on unsigned bytes."""
    signed, district = envelope(fmt, kind)
    tampered = Signed(signed.document.replace(b'"', b" ", 1), signed.key_id, signed.signature)
    with pytest.raises(DocumentRefused):
        verify(tampered, keys(fmt, district), PURPOSE[kind])


@pytest.mark.parametrize("kind", ["batch", "ack", "position"])
def test_a_new_document_verified_for_another_purpose_is_refused(kind: str):
    signed, district = envelope("documents-v1", kind)
    other = Purpose.FARES
    with pytest.raises(DocumentRefused, match="field 'purpose'"):
        verify(signed, keys("documents-v1", district), other)


@pytest.mark.parametrize(("fmt", "district"), EACH_BUNDLE)
def test_each_trust_bundle_verifies_and_re_encodes_byte_for_byte(fmt: str, district: str):
    data = (FIXTURES / fmt / f"bundle-{district}.json").read_bytes()
    signed = SignedBundle.from_json(data)
    assert signed.to_json() == data
    bundle = held_bundle(fmt, district)
    assert canonical(parse(signed.document, "bundle")) == signed.document
    if fmt == "documents-v0":
        assert bundle.document() == signed.document  # no key id or purpose then
    else:
        content = parse(signed.document, "bundle")
        assert content["purpose"] == "trust-bundle" and content["key_id"] == signed.signer
    assert bundle.settlement_keys  # the key the settlement documents above verify with
