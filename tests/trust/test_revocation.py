"""Revocation lists judged before they take effect, and the watermarks that keep them moving on.

Module under test: :mod:`broker.trust.revocation`. Lists are built here with the
``cryptography`` builder so that each rule of :func:`parse_crls` is broken exactly once;
the trust store that uses both on a district's files is tests/trust/test_store.py.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker.core.errors import ConfigError
from broker.trust import pki
from broker.trust.revocation import AcceptedCrl, Watermarks, parse_crls

D, OTHER = "500111", "512021"
SOURCE = "crl.pem"


@pytest.fixture
def ca(now: datetime) -> pki.KeyPair:
    return pki.create_ca(D, now)


def pem(*crls: x509.CertificateRevocationList) -> bytes:
    return b"".join(pki.crl_pem(c) for c in crls)


def listing(ca: pki.KeyPair, now: datetime, number: int, *serials: int, days: int = 7) -> bytes:
    """``ca``'s list number ``number`` revoking ``serials``, as a PEM file."""
    return pem(pki.build_crl(ca, [(s, now) for s in serials], number, now, days))


def hand_built(
    ca: pki.KeyPair,
    now: datetime,
    aki: bool = True,
    number: int | None = 1,
    signer: ec.EllipticCurvePrivateKey | None = None,
) -> bytes:
    """A list naming ``ca`` with the extensions chosen, signed by ``signer`` (default: ``ca``).

    ``aki=False`` is what ``openssl ca -gencrl`` writes by default.
    """
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - timedelta(minutes=1))
        .next_update(now + timedelta(days=7))
    )
    if aki:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    if number is not None:
        builder = builder.add_extension(x509.CRLNumber(number), critical=False)
    return pem(builder.sign(signer or ca.key, hashes.SHA256()))


def ca_without_ski(district: str, now: datetime) -> pki.KeyPair:
    """A CA made by hand, without the Subject Key Identifier every trust anchor needs."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"yikatong {district} CA, by hand")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return pki.KeyPair(cert, key)


# ----------------------------------------------------------------------------- parse_crls


def test_a_good_list_is_read_with_its_ca_number_serials_digest_and_next_update(ca, now):
    data = listing(ca, now, 4, 11, 22)
    got = parse_crls(data, SOURCE, D, [ca.cert])
    issuer = pki.ca_id(ca.cert)
    assert list(got) == [issuer]
    crl = got[issuer]
    assert (crl.issuer, crl.number, crl.serials) == (issuer, 4, frozenset({11, 22}))
    assert crl.next_update is not None
    assert timedelta(days=6) < crl.next_update - now <= timedelta(days=7)
    # The digest is of the list itself: the same list read again has the same one.
    assert parse_crls(data, SOURCE, D, [ca.cert])[issuer].sha256 == crl.sha256
    assert parse_crls(listing(ca, now, 4, 11), SOURCE, D, [ca.cert])[issuer].sha256 != crl.sha256


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "crl.pem holds no revocation list"),
        (b"# crl.pem is being copied, come back later\n", "crl.pem holds no revocation list"),
        (b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n", "holds no revocation"),
        (b"-----BEGIN X509 CRL-----\nbm90IGEgbGlzdA==\n-----END X509 CRL-----\n", "does not parse"),
        (b"-----BEGIN X509 CRL-----\nMIIB", "does not parse"),  # cut off mid-copy
    ],
    ids=["zero bytes", "text", "a certificate", "garbage inside the markers", "truncated"],
)
def test_a_file_without_a_usable_list_is_refused_naming_the_file(ca, data: bytes, message: str):
    with pytest.raises(ConfigError, match=message) as info:
        parse_crls(data, SOURCE, D, [ca.cert])
    assert SOURCE in str(info.value)


def test_a_list_without_an_authority_key_identifier_is_refused(ca, now):
    """What ``openssl ca -gencrl`` writes by default: it names no CA by key."""
    with pytest.raises(ConfigError, match=r"crl.pem \(list 1\) lacks its authorityKeyIdentifier"):
        parse_crls(hand_built(ca, now, aki=False), SOURCE, D, [ca.cert])


def test_a_list_without_a_crl_number_is_refused(ca, now):
    """Without a number it could not be told from an older list."""
    with pytest.raises(ConfigError, match=r"crl.pem \(list 1\) lacks its cRLNumber"):
        parse_crls(hand_built(ca, now, number=None), SOURCE, D, [ca.cert])


def test_a_list_of_a_ca_that_is_not_an_anchor_is_refused(ca, now):
    foreign = pki.create_ca(OTHER, now)
    with pytest.raises(ConfigError, match=f"not a trust anchor of {D}") as info:
        parse_crls(listing(foreign, now, 1), SOURCE, D, [ca.cert])
    assert pki.ca_id(foreign.cert) in str(info.value)


def test_a_list_naming_an_anchor_but_signed_by_another_key_is_refused(ca, now):
    rogue = ec.generate_private_key(ec.SECP256R1())
    forged = hand_built(ca, now, number=99, signer=rogue)
    with pytest.raises(ConfigError, match=f"is not signed by CA {pki.ca_id(ca.cert)}"):
        parse_crls(forged, SOURCE, D, [ca.cert])


def test_an_anchor_without_a_subject_key_identifier_is_refused(ca, now):
    with pytest.raises(ConfigError, match=f"a CA of district {D} has no Subject Key Identifier"):
        parse_crls(listing(ca, now, 1), SOURCE, D, [ca.cert, ca_without_ski(D, now).cert])


def test_one_bad_list_refuses_the_whole_file_and_is_named_by_position(ca, now):
    data = listing(ca, now, 1) + hand_built(ca, now, aki=False)
    with pytest.raises(ConfigError, match=r"\(list 2\) lacks"):
        parse_crls(data, SOURCE, D, [ca.cert])


@pytest.mark.parametrize("order", ["higher first", "higher last"])
def test_two_lists_of_one_ca_in_one_file_the_higher_number_counts(ca, now, order: str):
    older, newer = listing(ca, now, 2, 7), listing(ca, now, 3, 7, 8)
    data = newer + older if order == "higher first" else older + newer
    (crl,) = parse_crls(data, SOURCE, D, [ca.cert]).values()
    assert crl.number == 3 and crl.serials == {7, 8}


def test_each_ca_of_a_rotation_has_its_own_list(ca, now):
    new = pki.create_ca(D, now)
    got = parse_crls(listing(ca, now, 5, 1) + listing(new, now, 1), SOURCE, D, [ca.cert, new.cert])
    assert {k: (v.number, v.serials) for k, v in got.items()} == {
        pki.ca_id(ca.cert): (5, frozenset({1})),
        pki.ca_id(new.cert): (1, frozenset()),
    }


# ----------------------------------------------------------------------------- Watermarks


def accepted(ca: pki.KeyPair, now: datetime, number: int, *serials: int) -> AcceptedCrl:
    (crl,) = parse_crls(listing(ca, now, number, *serials), SOURCE, D, [ca.cert]).values()
    return crl


def test_anything_is_admitted_before_a_mark_is_held(ca, now):
    marks = Watermarks(None)
    assert marks.admits(D, accepted(ca, now, 1)) is None
    assert marks.admits(D, accepted(ca, now, 0)) is None


def test_a_higher_number_or_the_same_list_again_is_admitted(ca, now):
    marks = Watermarks(None)
    held = accepted(ca, now, 3, 1)
    marks.record(D, {held.issuer: held})
    assert marks.admits(D, held) is None  # the same list, read again
    assert marks.admits(D, accepted(ca, now, 4, 1)) is None
    assert marks.admits(D, accepted(ca, now, 40)) is None  # numbers may skip


def test_a_lower_number_is_refused(ca, now):
    marks = Watermarks(None)
    held = accepted(ca, now, 3, 1)
    marks.record(D, {held.issuer: held})
    reason = marks.admits(D, accepted(ca, now, 2))
    assert reason is not None
    assert "revocation list 2" in reason and "older than number 3, already accepted" in reason
    assert pki.ca_id(ca.cert) in reason and D in reason


def test_the_same_number_with_other_content_is_refused(ca, now):
    """A second list under one number: which one is real cannot be told, so neither replaces."""
    marks = Watermarks(None)
    held = accepted(ca, now, 3, 1)
    marks.record(D, {held.issuer: held})
    reason = marks.admits(D, accepted(ca, now, 3))  # the revocation of serial 1 dropped
    assert reason is not None and "differs from the one accepted under that number" in reason


def test_marks_are_kept_per_district(ca, now):
    marks = Watermarks(None)
    held = accepted(ca, now, 3)
    marks.record(D, {held.issuer: held})
    assert marks.admits(OTHER, accepted(ca, now, 1)) is None


def test_record_never_lowers_a_mark(ca, now):
    marks = Watermarks(None)
    high = accepted(ca, now, 5)
    marks.record(D, {high.issuer: high})
    low = accepted(ca, now, 2)
    marks.record(D, {low.issuer: low})
    assert marks.admits(D, low) is not None
    assert marks.admits(D, high) is None


def test_marks_survive_in_the_state_file_and_a_new_instance_reads_them(ca, now, tmp_path: Path):
    state = tmp_path / "var" / "crl-state"
    marks = Watermarks(state)
    assert not state.exists()  # nothing to remember yet
    new = pki.create_ca(D, now)
    held = {c.issuer: c for c in (accepted(ca, now, 3, 9), accepted(new, now, 1))}
    marks.record(D, held)
    assert state.exists()
    lines = sorted(state.read_text().splitlines())
    assert lines == sorted(f"{D}/{c.issuer} {c.number} {c.sha256}" for c in held.values())

    again = Watermarks(state)  # a restart
    assert again.admits(D, accepted(ca, now, 2)) is not None
    assert again.admits(D, accepted(ca, now, 3)) is not None  # same number, other content
    assert again.admits(D, held[pki.ca_id(ca.cert)]) is None
    assert again.admits(D, accepted(ca, now, 4)) is None


def test_an_empty_state_file_holds_no_marks(ca, now, tmp_path: Path):
    state = tmp_path / "crl-state"
    state.write_text("")
    assert Watermarks(state).admits(D, accepted(ca, now, 1)) is None


@pytest.mark.parametrize(
    "content",
    [
        b"500111/0123456789abcdef 3\n",  # a field missing
        b"500111/0123456789abcdef three abc\n",  # not a number
        b"500111/0123456789abcdef 3 abc extra\n",  # a field too many
        b"\xff\xfe\x00garbled",  # not text
    ],
    ids=["missing field", "not a number", "extra field", "binary"],
)
def test_a_garbled_state_file_stops_the_node_rather_than_forgetting(tmp_path: Path, content):
    state = tmp_path / "crl-state"
    state.write_bytes(content)
    with pytest.raises(ConfigError, match=r"revocation state .*crl-state cannot be read"):
        Watermarks(state)


def test_an_unreadable_state_file_stops_the_node(tmp_path: Path):
    state = tmp_path / "crl-state"
    state.mkdir()  # exists, but cannot be read as a file (and root ignores file modes)
    with pytest.raises(ConfigError, match="cannot be read"):
        Watermarks(state)


def test_record_writes_only_when_a_mark_moved(ca, now, tmp_path: Path):
    state = tmp_path / "crl-state"
    marks = Watermarks(state)
    first = accepted(ca, now, 3)
    marks.record(D, {first.issuer: first})
    before = os.stat(state)
    # The same list again, and an older one: nothing moves, nothing is written
    # (the file is replaced by rename when written, so its inode would change).
    marks.record(D, {first.issuer: first})
    marks.record(D, {first.issuer: accepted(ca, now, 2)})
    marks.record(D, {})
    after = os.stat(state)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    marks.record(D, {first.issuer: accepted(ca, now, 4)})
    assert os.stat(state).st_ino != before.st_ino
    assert " 4 " in state.read_text()


def test_without_a_state_file_marks_live_in_memory_only(ca, now, tmp_path: Path):
    marks = Watermarks(None)
    held = accepted(ca, now, 3)
    marks.record(D, {held.issuer: held})
    assert marks.admits(D, accepted(ca, now, 2)) is not None
    assert list(tmp_path.iterdir()) == []
