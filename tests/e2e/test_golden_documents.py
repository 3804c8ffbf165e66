"""Signed documents as the previous release made them verify and re-encode byte for byte.

``tests/fixtures/documents-v0/`` holds one document of each kind that districts sign —
fare publication, batch trailer, acknowledgement, position and its reply — and each
district's signed trust bundle, as the code before the one-signing-module work wrote
them (``scripts/make-golden-documents``, run once). A home district stores published
fare versions by digest, so a byte changed by re-encoding would turn the next
publication of an unchanged version into ALREADY_EXISTS: re-encoding must be exact.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from broker.core.errors import DocumentRefused
from broker.core.signing import Purpose, Signed, canonical, parse_public_keys, verify
from broker.trust import bundle as bundles
from broker.trust.bundle import Bundle, SignedBundle

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "documents-v0"
KINDS = ("fares", "batch", "ack", "position", "position-reply")
PURPOSE = {
    "fares": Purpose.FARES,
    "batch": Purpose.BATCH,
    "ack": Purpose.ACK,
    "position": Purpose.POSITION,
    "position-reply": Purpose.POSITION,
}
DISTRICTS = ("500111", "512021", "500153")


def held_bundle(district: str) -> Bundle:
    signed = SignedBundle.from_json((GOLDEN / f"bundle-{district}.json").read_bytes())
    return bundles.verify(signed, district, None, 0)


def envelope(kind: str) -> tuple[Signed, str]:
    raw = json.loads((GOLDEN / f"{kind}.json").read_text())
    signed = Signed(raw["document"].encode(), raw["key_id"], base64.b64decode(raw["signature"]))
    return signed, raw["district"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_verifies_with_its_districts_bundle_key(kind: str):
    signed, district = envelope(kind)
    content = verify(
        signed, parse_public_keys(held_bundle(district).settlement_keys), PURPOSE[kind]
    )
    assert content["type"] == kind.removesuffix("-reply")
    assert content.get("from", content.get("district")) == district


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_re_encodes_byte_for_byte(kind: str):
    signed, _ = envelope(kind)
    assert canonical(json.loads(signed.document)) == signed.document


@pytest.mark.parametrize("kind", KINDS)
def test_a_golden_document_with_one_byte_changed_is_refused(kind: str):
    """The fixtures are real signatures: the test above cannot pass on unsigned bytes."""
    signed, district = envelope(kind)
    tampered = Signed(signed.document.replace(b'"', b" ", 1), signed.key_id, signed.signature)
    with pytest.raises(DocumentRefused):
        verify(tampered, parse_public_keys(held_bundle(district).settlement_keys), PURPOSE[kind])


@pytest.mark.parametrize("district", DISTRICTS)
def test_each_trust_bundle_verifies_and_re_encodes_byte_for_byte(district: str):
    data = (GOLDEN / f"bundle-{district}.json").read_bytes()
    signed = SignedBundle.from_json(data)
    assert signed.to_json() == data
    bundle = held_bundle(district)
    assert bundle.document() == signed.document  # v0 bundles carry no key id or purpose
    assert canonical(json.loads(signed.document)) == signed.document
    assert bundle.settlement_keys  # the key the settlement documents above verify with
