"""Signed documents: RFC 8785 encoding, strict parsing, signatures bound to key and purpose."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core.errors import ConfigError, DocumentRefused
from broker.core.signing import (
    Purpose,
    Signed,
    Signer,
    canonical,
    key_id,
    parse,
    parse_public_keys,
    unsigned_body,
    verify,
)

# Spelled in two parts so that no scanner for committed keys mistakes a test for one.
PEM_KEY_HEADER = b"-----BEGIN " + b"PRIVATE KEY-----"

DOC = {"day": "2026-11-28", "from": "512021", "to": "500111", "total_fen": 12345, "n": 3}
PURPOSE = Purpose.POSITION  # what DOC is signed for, unless a test says otherwise
SAFE = 2**53 - 1  # the largest integer RFC 8785 (I-JSON) allows


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer(ed25519.Ed25519PrivateKey.generate())


def _public_pem(key: ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def _flip(data: bytes, i: int) -> bytes:
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]


def _old_encoder(doc: dict[str, Any]) -> bytes:
    """The previous release's canonical JSON."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


HAND = ed25519.Ed25519PrivateKey.generate()
HAND_KID = key_id(HAND.public_key())
HAND_KEYS = {HAND_KID: HAND.public_key()}


def _by_hand(document: bytes) -> Signed:
    """``document`` signed as is by HAND, bypassing Signer.sign."""
    return Signed(document, HAND_KID, HAND.sign(document))


# ---------------------------------------------------------------- signing and verifying


def test_a_signed_document_verifies_and_gives_back_its_content(signer: Signer):
    content = verify(signer.sign(DOC, PURPOSE), signer.public_keys(), PURPOSE)
    assert unsigned_body(content) == DOC
    assert (content["key_id"], content["purpose"]) == (signer.key_id, "day-position")


def test_the_signature_covers_the_canonical_bytes_under_the_signers_key_id(signer: Signer):
    signed = signer.sign(DOC, PURPOSE)
    assert signed.document == canonical({**DOC, "key_id": signer.key_id, "purpose": PURPOSE})
    assert signed.key_id == signer.key_id
    assert len(signed.signature) == 64  # Ed25519


def test_a_document_rebuilt_from_the_received_parts_still_verifies(signer: Signer):
    """What a peer receives is bytes + key id + signature; rebuilt, it verifies the same."""
    signed = signer.sign(DOC, PURPOSE)
    received = Signed(bytes(signed.document), str(signed.key_id), bytes(signed.signature))
    assert verify(received, signer.public_keys(), PURPOSE) == signed.content()


def test_every_changed_byte_of_the_document_is_refused(signer: Signer):
    signed = signer.sign(DOC, PURPOSE)
    keys = signer.public_keys()
    for i in range(len(signed.document)):
        tampered = dataclasses.replace(signed, document=_flip(signed.document, i))
        with pytest.raises(DocumentRefused, match="does not verify"):
            verify(tampered, keys, PURPOSE)


def test_every_changed_byte_of_the_signature_is_refused(signer: Signer):
    signed = signer.sign(DOC, PURPOSE)
    keys = signer.public_keys()
    for i in range(len(signed.signature)):
        tampered = dataclasses.replace(signed, signature=_flip(signed.signature, i))
        with pytest.raises(DocumentRefused, match="does not verify"):
            verify(tampered, keys, PURPOSE)


@pytest.mark.parametrize("signature", [b"", b"\x00" * 64, b"\x00" * 63, b"\xff" * 65])
def test_an_empty_or_malformed_signature_is_refused(signer: Signer, signature: bytes):
    signed = dataclasses.replace(signer.sign(DOC, PURPOSE), signature=signature)
    with pytest.raises(DocumentRefused, match="does not verify"):
        verify(signed, signer.public_keys(), PURPOSE)


def test_a_re_encoded_document_with_another_amount_is_refused(signer: Signer):
    signed = signer.sign(DOC, PURPOSE)
    grown = canonical({**signed.content(), "total_fen": 99999})
    with pytest.raises(DocumentRefused, match="does not verify"):
        verify(dataclasses.replace(signed, document=grown), signer.public_keys(), PURPOSE)


def test_an_unknown_key_id_is_refused_before_any_signature_check(signer: Signer):
    signed = signer.sign(DOC, PURPOSE)
    with pytest.raises(DocumentRefused, match="not trusted"):
        verify(signed, {}, PURPOSE)
    with pytest.raises(DocumentRefused, match="not trusted"):
        verify(dataclasses.replace(signed, key_id="0" * 16), signer.public_keys(), PURPOSE)


def test_a_signature_by_another_key_under_a_trusted_key_id_is_refused(signer: Signer):
    """Claiming a trusted key id does not help: the named key must have made the signature."""
    intruder = Signer(ed25519.Ed25519PrivateKey.generate())
    intruder.key_id = signer.key_id
    with pytest.raises(DocumentRefused, match="does not verify"):
        verify(intruder.sign(DOC, PURPOSE), signer.public_keys(), PURPOSE)


def test_a_verified_document_that_is_not_a_json_object_is_refused():
    for document in (b"[1,2,3]", b'"text"', b"42", b"null"):
        with pytest.raises(DocumentRefused, match="day-position document is not a JSON object"):
            verify(_by_hand(document), HAND_KEYS, PURPOSE)


# ---------------------------------------------------------------- key id and purpose


def test_a_document_signed_for_one_purpose_is_refused_for_another(signer: Signer):
    signed = signer.sign(DOC, Purpose.POSITION)
    with pytest.raises(DocumentRefused, match="'purpose' is 'day-position'"):
        verify(signed, signer.public_keys(), Purpose.ACK)


def test_a_document_naming_another_key_than_its_envelope_is_refused():
    body = canonical({**DOC, "key_id": "0123456789abcdef", "purpose": PURPOSE.value})
    with pytest.raises(DocumentRefused, match="'key_id' does not name the key"):
        verify(_by_hand(body), HAND_KEYS, PURPOSE)


@pytest.mark.parametrize("purpose", list(Purpose))
def test_a_document_of_the_previous_release_takes_the_callers_purpose(purpose: Purpose):
    """No key_id or purpose inside, signed over the old encoder's bytes: accepted as is."""
    assert verify(_by_hand(_old_encoder(DOC)), HAND_KEYS, purpose) == DOC


@pytest.mark.parametrize("sequence", ['"1"', "true", "null", "[1]", "1.9"])
@pytest.mark.parametrize("signing_fields", [True, False], ids=["new", "legacy"])
def test_a_validly_signed_batch_whose_sequence_is_not_an_integer_is_refused(
    sequence: str, signing_fields: bool
):
    extra = f',"key_id":"{HAND_KID}","purpose":"batch-trailer"' if signing_fields else ""
    document = ('{"type":"batch","sequence":' + sequence + extra + ',"lines":2}').encode()
    with pytest.raises(DocumentRefused, match="batch-trailer document: field 'sequence'"):
        verify(_by_hand(document), HAND_KEYS, Purpose.BATCH)


@pytest.mark.parametrize(
    ("document", "match"),
    [
        (b'{"total_fen":1,"total_fen":99999}', "'total_fen' appears twice"),
        (b'{"n":{"fen":1,"fen":2}}', "'fen' appears twice"),
        (b'{"total_fen":12345.0}', "'total_fen' is 12345.0, not an integer"),
        (b'{"total_fen":NaN}', "'total_fen' is NaN"),
    ],
)
def test_a_validly_signed_document_that_does_not_parse_strictly_is_refused(
    document: bytes, match: str
):
    with pytest.raises(DocumentRefused, match=match):
        verify(_by_hand(document), HAND_KEYS, PURPOSE)


# ---------------------------------------------------------------- canonical JSON (RFC 8785)


@pytest.mark.parametrize(
    "doc",
    [
        {"district": "大足区", "name": "重庆市荣昌区公交", "fen": 200},
        {"note": 'tab\tnl\ncr\rnul\x00unit\x1fdel\x7fls\u2028quote"back\\slash/'},
        {"table": [[1, [2, [3, []]]], {"b": [None, True, False]}, "x"], "a": {}},
        {"n": -SAFE, "m": SAFE, "z": 0, "e": "", "l": []},
    ],
    ids=["chinese", "control", "nested", "integers"],
)
def test_canonical_is_rfc8785_and_the_previous_releases_bytes(doc: dict[str, Any]):
    assert canonical(doc) == rfc8785.dumps(doc)
    assert canonical(doc) == _old_encoder(doc)


@pytest.mark.parametrize(
    ("doc", "where"),
    [({"a": 1.0}, "document.a"), ({"t": [{"x": 0.5}]}, r"document.t\[0\].x")],
)
def test_canonical_refuses_a_float(doc: dict[str, Any], where: str):
    with pytest.raises(ValueError, match=f"{where} is a float"):
        canonical(doc)


@pytest.mark.parametrize("n", [SAFE + 1, -SAFE - 1, 2**64])
def test_canonical_refuses_an_integer_beyond_2_to_the_53(n: int):
    with pytest.raises(ValueError, match="cannot be canonicalised"):
        canonical({"fen": n})


def test_canonical_json_does_not_depend_on_key_order():
    a = {"b": 1, "a": {"y": [1, 2], "x": None}}
    b = {"a": {"x": None, "y": [1, 2]}, "b": 1}
    assert canonical(a) == canonical(b)
    assert canonical(a) == b'{"a":{"x":null,"y":[1,2]},"b":1}'  # sorted, no spaces


def test_canonical_json_keeps_list_order_and_differs_for_different_content():
    assert canonical({"v": [1, 2]}) != canonical({"v": [2, 1]})
    assert canonical({"v": 1}) != canonical({"v": "1"})


def test_keys_beyond_the_bmp_are_ordered_by_utf16_unlike_the_previous_encoder():
    """The one known difference from the old encoder; no district signs such keys."""
    doc = {"\U0001f600": 1, "\uff01": 2}
    assert canonical(doc) == '{"\U0001f600":1,"\uff01":2}'.encode()
    assert _old_encoder(doc) == '{"\uff01":2,"\U0001f600":1}'.encode()


def test_signatures_from_differently_ordered_dicts_verify_alike(signer: Signer):
    signed = signer.sign(dict(reversed(list(DOC.items()))), PURPOSE)
    assert signed.document == signer.sign(DOC, PURPOSE).document
    assert unsigned_body(verify(signed, signer.public_keys(), PURPOSE)) == DOC


def _documents(keys: st.SearchStrategy[str]) -> st.SearchStrategy[dict[str, Any]]:
    text = st.text(st.characters(codec="utf-8"), max_size=8)  # no lone surrogates
    scalars = st.none() | st.booleans() | st.integers(-SAFE, SAFE) | text
    values = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
        max_leaves=20,
    )
    return st.dictionaries(keys, values, max_size=6)


@settings(database=None)
@given(_documents(st.text(st.characters(codec="utf-8"), max_size=6)))
def test_any_document_survives_encoding_and_strict_parsing(doc: dict[str, Any]):
    assert parse(canonical(doc), "x") == doc


@settings(database=None)
@given(_documents(st.text(st.characters(codec="ascii"), max_size=6)))
def test_canonical_equals_the_previous_encoder_for_ascii_keys(doc: dict[str, Any]):
    assert canonical(doc) == _old_encoder(doc)


# ---------------------------------------------------------------- strict parsing


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b'{"a":1,"b":2,"a":1}', "x document: field 'a' appears twice"),
        (b'{"t":[{"fen":1,"fen":1}]}', "x document: field 'fen' appears twice"),
        (b'{"a":NaN}', "field 'a' is NaN, not an integer"),
        (b'{"a":[Infinity]}', r"field 'a\[0\]' is Infinity, not an integer"),
        (b'{"a":{"b":-Infinity}}', "field 'a.b' is -Infinity, not an integer"),
        (b'{"table":[{"gross_fare_fen":1.0}]}', r"'table\[0\].gross_fare_fen' is 1.0, not"),
        (b'{"table":[{"gross_fare_fen":1.9}]}', r"'table\[0\].gross_fare_fen' is 1.9, not"),
        (b'{"table":[{"gross_fare_fen":1e3}]}', r"'table\[0\].gross_fare_fen' is 1e3, not"),
        (b'{"a":"\xff"}', "x document is not UTF-8"),
        (b"", "x document is not JSON"),
        (b'{"a":1', "x document is not JSON"),
        (b'{"a":1} {}', "x document is not JSON"),
        (b"[]", "x document is not a JSON object"),
        (b'"text"', "x document is not a JSON object"),
        (b"1", "x document is not a JSON object"),
        (b"null", "x document is not a JSON object"),
        (b'{"a":' + b"9" * 5000 + b"}", "x document is not acceptable JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "x document is nested too deeply"),
        (b'{"a":' + b'{"a":' * 100_000 + b"1" + b"}" * 100_001, "nested too deeply"),
    ],
    ids=lambda v: v[:30] if isinstance(v, bytes) else None,
)
def test_parse_refuses_what_two_parsers_could_read_two_ways(data: bytes, match: str):
    with pytest.raises(DocumentRefused, match=match):
        parse(data, "x")


def test_parse_reads_text_and_bytes_alike_and_names_the_kind():
    content = parse('{"名":"大足","n":-0}', "fare-publication")
    assert content == parse('{"名":"大足","n":-0}'.encode(), "fare-publication")
    assert content == {"名": "大足", "n": 0}
    assert content.kind == "fare-publication"


@pytest.mark.parametrize(
    ("value", "what"),
    [
        ('"1"', "must be an integer, not str"),
        ("true", "must be an integer, not bool"),
        ("[1]", "must be an integer, not list"),
        ("null", "is required"),
    ],
)
def test_the_integer_reader_names_the_kind_and_field(value: str, what: str):
    content = parse('{"sequence":' + value + ',"lines":3}', "batch-trailer")
    assert content.integer("lines") == 3
    with pytest.raises(DocumentRefused, match=f"batch-trailer document: field 'sequence' {what}"):
        content.integer("sequence")
    with pytest.raises(DocumentRefused, match="field 'absent' is required"):
        content.integer("absent")


def test_the_other_readers_refuse_the_wrong_type_naming_the_field():
    content = parse(b'{"s":1,"f":"yes","a":{},"ok":[true]}', "day-position")
    for read, field, what in [
        (content.text, "s", "must be a string, not int"),
        (content.text, "absent", "is required"),
        (content.flag, "f", "must be true or false"),
        (content.flag, "absent", "must be true or false"),
        (content.array, "a", "must be a list"),
    ]:
        with pytest.raises(DocumentRefused, match=f"day-position document: field '{field}' {what}"):
            read(field)
    assert content.array("ok") == [True]


# ---------------------------------------------------------------- ECDSA (a CA signing its bundle)


def test_an_ecdsa_signer_signs_under_the_key_id_it_must_be_given():
    key = ec.generate_private_key(ec.SECP256R1())
    ca = Signer(key, "ca-0123456789ab")
    signed = ca.sign(DOC, Purpose.TRUST_BUNDLE)
    content = verify(signed, {"ca-0123456789ab": key.public_key()}, Purpose.TRUST_BUNDLE)
    assert (content["key_id"], content["purpose"]) == ("ca-0123456789ab", "trust-bundle")
    assert set(ca.public_keys()) == {"ca-0123456789ab"}
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(DocumentRefused, match="does not verify"):
        verify(signed, {"ca-0123456789ab": other}, Purpose.TRUST_BUNDLE)
    with pytest.raises(ValueError, match="pass the key id"):
        Signer(ec.generate_private_key(ec.SECP256R1()))


# ---------------------------------------------------------------- the signed file envelope


@pytest.mark.parametrize("key_field", ["key_id", "signer"])
def test_a_signed_file_round_trips(signer: Signer, key_field: str):
    signed = signer.sign({**DOC, "name": "大足区"}, PURPOSE)
    back = Signed.from_file(signed.to_file(key_field), key_field)
    assert back == signed
    assert unsigned_body(verify(back, signer.public_keys(), PURPOSE))["name"] == "大足区"


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x00\xffgarbage", "bundle file document is not UTF-8"),
        (b"garbage", "bundle file document is not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"key_id":"k","signature":"AAAA"}', "'document' is required"),
        (b'{"document":"{}","signature":"AAAA"}', "'key_id' is required"),
        (b'{"document":"{}","key_id":"k"}', "'signature' is required"),
        (b'{"document":{},"key_id":"k","signature":"AAAA"}', "'document' must be a string"),
        (b'{"document":"{}","key_id":"k","signature":"!!!!"}', "bundle file: field 'signature'"),
        (b'{"document":"{}","key_id":"k","signature":"AAA"}', "'signature' is not base64"),
    ],
)
def test_a_malformed_signed_file_is_refused(data: bytes, match: str):
    with pytest.raises(DocumentRefused, match=match):
        Signed.from_file(data, kind="bundle")


def test_a_signed_file_with_a_non_ascii_signature_is_refused():
    """Signed.from_file catches binascii.Error; b64decode of non-ASCII text raises ValueError."""
    with pytest.raises(DocumentRefused, match="'signature' is not base64"):
        Signed.from_file('{"document":"{}","key_id":"k","signature":"签名"}'.encode())


# ---------------------------------------------------------------- key ids and trusted keys


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
    assert unsigned_body(verify(signer.sign(DOC, PURPOSE), keys, PURPOSE)) == DOC


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


# ---------------------------------------------------------------- loading the settlement key


def _write_key(
    path: Path,
    key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | ed448.Ed448PrivateKey,
    encryption: serialization.KeySerializationEncryption | None = None,
) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            encryption or serialization.NoEncryption(),
        )
    )
    return path


def test_signer_from_file_loads_the_key_that_was_written(tmp_path: Path):
    key = ed25519.Ed25519PrivateKey.generate()
    loaded = Signer.from_file(_write_key(tmp_path / "settlement.key", key))
    assert loaded.key_id == key_id(key.public_key())
    # What it signs verifies under the public half as a peer would hold it.
    keys = parse_public_keys(((loaded.key_id, _public_pem(key.public_key())),))
    assert unsigned_body(verify(loaded.sign(DOC, PURPOSE), keys, PURPOSE)) == DOC


def test_signer_from_file_refuses_a_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot be read"):
        Signer.from_file(tmp_path / "absent.key")


@pytest.mark.parametrize("content", [b"", b"not a key", PEM_KEY_HEADER + b"\nAAAA\n"])
def test_signer_from_file_refuses_garbage(tmp_path: Path, content: bytes):
    path = tmp_path / "settlement.key"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="cannot be read"):
        Signer.from_file(path)


def test_signer_from_file_refuses_an_encrypted_key(tmp_path: Path):
    locked = serialization.BestAvailableEncryption(b"passphrase")
    path = _write_key(tmp_path / "s.key", ed25519.Ed25519PrivateKey.generate(), locked)
    with pytest.raises(ConfigError, match="cannot be read"):
        Signer.from_file(path)


@pytest.mark.parametrize(
    "key",
    [ec.generate_private_key(ec.SECP256R1()), ed448.Ed448PrivateKey.generate()],
    ids=["p256", "ed448"],
)
def test_signer_from_file_refuses_a_key_of_another_algorithm(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey | ed448.Ed448PrivateKey
):
    with pytest.raises(ConfigError, match="not an Ed25519 key"):
        Signer.from_file(_write_key(tmp_path / "other.key", key))


def test_signer_from_file_refuses_a_public_key(tmp_path: Path):
    path = tmp_path / "public.pem"
    path.write_text(_public_pem(ed25519.Ed25519PrivateKey.generate().public_key()))
    with pytest.raises(ConfigError, match="cannot be read"):
        Signer.from_file(path)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (b'{"sequence": 9007199254740992}', "sequence"),  # 2**53: a double parser rounds it
        (b'{"a": [-18446744073709551616]}', "a[0]"),
        (b'{"s": "\\ud800"}', "s"),  # a lone surrogate: no UTF-8 encoder writes it
        (b'{"\\udfff": 1}', "<key>"),
    ],
)
def test_values_other_parsers_would_read_differently_are_refused(text: bytes, field: str):
    with pytest.raises(DocumentRefused, match=re.escape(f"field {field!r}")):
        parse(text, "batch-trailer")
    assert parse(b'{"sequence": 9007199254740991}', "x")["sequence"] == 2**53 - 1
