"""Signed settlement documents: canonical JSON, Ed25519 signatures, key ids, key loading."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from broker.core.errors import ConfigError, DocumentRefused
from broker.core.signing import (
    Signed,
    Signer,
    canonical,
    key_id,
    parse_public_keys,
    verify,
)

# Spelled in two parts so that no scanner for committed keys mistakes a test for one.
PEM_KEY_HEADER = b"-----BEGIN " + b"PRIVATE KEY-----"

DOC = {"day": "2026-11-28", "from": "512021", "to": "500111", "total_fen": 12345, "n": 3}


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer(ed25519.Ed25519PrivateKey.generate())


def _public_pem(key: ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def _flip(data: bytes, i: int) -> bytes:
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]


def test_a_signed_document_verifies_and_gives_back_its_content(signer: Signer):
    signed = signer.sign(DOC)
    assert verify(signed, signer.public_keys()) == DOC


def test_the_signature_covers_the_canonical_bytes_under_the_signers_key_id(signer: Signer):
    signed = signer.sign(DOC)
    assert signed.document == canonical(DOC)
    assert signed.key_id == signer.key_id
    assert len(signed.signature) == 64  # Ed25519


def test_a_document_rebuilt_from_the_received_parts_still_verifies(signer: Signer):
    """What a peer receives is bytes + key id + signature; rebuilt, it verifies the same."""
    signed = signer.sign(DOC)
    received = Signed(bytes(signed.document), str(signed.key_id), bytes(signed.signature))
    assert verify(received, signer.public_keys()) == DOC


def test_every_changed_byte_of_the_document_is_refused(signer: Signer):
    signed = signer.sign(DOC)
    keys = signer.public_keys()
    for i in range(len(signed.document)):
        tampered = dataclasses.replace(signed, document=_flip(signed.document, i))
        with pytest.raises(DocumentRefused, match="does not verify"):
            verify(tampered, keys)


def test_every_changed_byte_of_the_signature_is_refused(signer: Signer):
    signed = signer.sign(DOC)
    keys = signer.public_keys()
    for i in range(len(signed.signature)):
        tampered = dataclasses.replace(signed, signature=_flip(signed.signature, i))
        with pytest.raises(DocumentRefused, match="does not verify"):
            verify(tampered, keys)


@pytest.mark.parametrize("signature", [b"", b"\x00" * 64, b"\x00" * 63, b"\xff" * 65])
def test_an_empty_or_malformed_signature_is_refused(signer: Signer, signature: bytes):
    signed = dataclasses.replace(signer.sign(DOC), signature=signature)
    with pytest.raises(DocumentRefused):
        verify(signed, signer.public_keys())


def test_a_re_encoded_document_with_another_amount_is_refused(signer: Signer):
    signed = signer.sign(DOC)
    grown = canonical({**DOC, "total_fen": 99999})
    with pytest.raises(DocumentRefused):
        verify(dataclasses.replace(signed, document=grown), signer.public_keys())


def test_an_unknown_key_id_is_refused_before_any_signature_check(signer: Signer):
    signed = signer.sign(DOC)
    with pytest.raises(DocumentRefused, match="not in the bundle"):
        verify(signed, {})
    with pytest.raises(DocumentRefused, match="not in the bundle"):
        verify(dataclasses.replace(signed, key_id="0" * 16), signer.public_keys())


def test_a_signature_by_another_key_under_a_trusted_key_id_is_refused(signer: Signer):
    """Claiming a trusted key id does not help: the named key must have made the signature."""
    intruder = Signer(ed25519.Ed25519PrivateKey.generate())
    forged = dataclasses.replace(intruder.sign(DOC), key_id=signer.key_id)
    with pytest.raises(DocumentRefused, match="does not verify"):
        verify(forged, signer.public_keys())


def test_a_verified_document_that_is_not_a_json_object_is_refused():
    key = ed25519.Ed25519PrivateKey.generate()
    kid = key_id(key.public_key())
    for document in (b"[1,2,3]", b'"text"', b"42", b"null"):
        signed = Signed(document, kid, key.sign(document))
        with pytest.raises(DocumentRefused, match="not a JSON object"):
            verify(signed, {kid: key.public_key()})


def test_canonical_json_does_not_depend_on_key_order():
    a = {"b": 1, "a": {"y": [1, 2], "x": None}}
    b = {"a": {"x": None, "y": [1, 2]}, "b": 1}
    assert canonical(a) == canonical(b)
    assert canonical(a) == b'{"a":{"x":null,"y":[1,2]},"b":1}'  # sorted, no spaces


def test_canonical_json_keeps_list_order_and_differs_for_different_content():
    assert canonical({"v": [1, 2]}) != canonical({"v": [2, 1]})
    assert canonical({"v": 1}) != canonical({"v": "1"})


def test_canonical_json_writes_non_ascii_as_utf8():
    data = canonical({"name": "大足区"})
    assert data == '{"name":"大足区"}'.encode()
    assert json.loads(data) == {"name": "大足区"}


def test_signatures_from_differently_ordered_dicts_verify_alike(signer: Signer):
    reordered = dict(reversed(list(DOC.items())))
    assert signer.sign(reordered).document == signer.sign(DOC).document
    assert verify(signer.sign(reordered), signer.public_keys()) == DOC


def test_key_id_is_16_hex_digits_of_sha256_over_the_raw_public_key():
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    kid = key_id(key)
    assert kid == hashlib.sha256(raw).hexdigest()[:16]
    assert len(kid) == 16
    assert kid != key_id(ed25519.Ed25519PrivateKey.generate().public_key())


def test_parse_public_keys_accepts_keys_whose_id_matches(signer: Signer):
    pem = _public_pem(signer.public_keys()[signer.key_id])
    keys = parse_public_keys(((signer.key_id, pem),))
    assert set(keys) == {signer.key_id}
    assert verify(signer.sign(DOC), keys) == DOC


def test_parse_public_keys_ignores_a_key_filed_under_another_id(signer: Signer):
    """A bundle naming a key by the wrong id must not make that id trusted."""
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    good = (signer.key_id, _public_pem(signer.public_keys()[signer.key_id]))
    keys = parse_public_keys((good, (signer.key_id[::-1], _public_pem(other)), ("x", good[1])))
    assert set(keys) == {signer.key_id}


def test_parse_public_keys_ignores_a_key_of_another_algorithm():
    ec_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    assert parse_public_keys((("0123456789abcdef", _public_pem(ec_key)),)) == {}


def test_parse_public_keys_of_nothing_is_empty():
    assert parse_public_keys(()) == {}


def _write_key(path: Path, key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def test_signer_from_file_loads_the_key_that_was_written(tmp_path: Path):
    key = ed25519.Ed25519PrivateKey.generate()
    loaded = Signer.from_file(_write_key(tmp_path / "settlement.key", key))
    assert loaded.key_id == key_id(key.public_key())
    # What it signs verifies under the public half as a peer would hold it.
    keys = parse_public_keys(((loaded.key_id, _public_pem(key.public_key())),))
    assert verify(loaded.sign(DOC), keys) == DOC


def test_signer_from_file_refuses_a_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot be read"):
        Signer.from_file(tmp_path / "absent.key")


@pytest.mark.parametrize("content", [b"", b"not a key", PEM_KEY_HEADER + b"\nAAAA\n"])
def test_signer_from_file_refuses_garbage(tmp_path: Path, content: bytes):
    path = tmp_path / "settlement.key"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="cannot be read"):
        Signer.from_file(path)


def test_signer_from_file_refuses_a_key_of_another_algorithm(tmp_path: Path):
    path = _write_key(tmp_path / "ec.key", ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(ConfigError, match="not an Ed25519 key"):
        Signer.from_file(path)


def test_signer_from_file_refuses_a_public_key(tmp_path: Path):
    path = tmp_path / "public.pem"
    path.write_text(_public_pem(ed25519.Ed25519PrivateKey.generate().public_key()))
    with pytest.raises(ConfigError):
        Signer.from_file(path)
