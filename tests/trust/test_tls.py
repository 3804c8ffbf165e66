"""Judging a caller's certificate in code, the TLS version floor, and the server's certificates.

Module under test: :mod:`broker.trust.tls`. No server runs: the node's guard hands the
verifier the caller's leaf PEM and the negotiated TLS version from gRPC's auth context
(``{"x509_pem_cert": [pem], "ssl_tls_version": [b"TLSv1.3"], ...}``, lists of bytes), so the
tests feed it exactly that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker.core.errors import PermissionDenied, Unauthenticated
from broker.trust import pki
from broker.trust.config import PeerConfig, TLSConfig, TrustConfig, node_server_name
from broker.trust.identity import Identity, Role, node_identity, operator_identity
from broker.trust.store import TrustStore
from broker.trust.tls import CallerVerifier, ServerCertificates, check_tls_version, spiffe_ids

HOME, PEER, STRANGER = "500111", "512021", "500153"
AuthContext = dict[str, list[bytes]]


@dataclass(frozen=True)
class Settings:
    """The trust part of a node's configuration (a ``TrustSettings``)."""

    district: str
    tls: TLSConfig
    peers: tuple[PeerConfig, ...] = ()
    trust: TrustConfig = field(default_factory=TrustConfig)

    def peer(self, district: str) -> PeerConfig | None:
        return next((p for p in self.peers if p.district == district), None)


@dataclass
class World:
    """Home district's node trusting itself and one peer; a third district it does not know."""

    now: datetime
    settings: Settings
    store: TrustStore
    home_ca: pki.KeyPair
    peer_ca: pki.KeyPair
    stranger_ca: pki.KeyPair
    numbers: dict[Path, int] = field(default_factory=dict)

    def revoke(self, ca: pki.KeyPair, crl_file: Path, *serials: int) -> None:
        """Publish ``ca``'s next revocation list (numbers only grow) and reload."""
        self.numbers[crl_file] = self.numbers.get(crl_file, 1) + 1
        crl = pki.build_crl(ca, [(s, self.now) for s in serials], self.numbers[crl_file], self.now)
        pki.write_public(crl_file, pki.crl_pem(crl))
        assert self.store.reload()


@pytest.fixture
def world(tmp_path: Path, now: datetime) -> World:
    home_ca, peer_ca = pki.create_ca(HOME, now), pki.create_ca(PEER, now)
    node = pki.issue(home_ca, node_identity(HOME), now)
    d = tmp_path / HOME
    pki.write_public(d / "ca.pem", home_ca.cert_pem())
    pki.save(node, d / "node.pem", d / "node.key")
    pki.write_public(tmp_path / "peer-ca.pem", peer_ca.cert_pem())
    for ca, crl_file in ((home_ca, d / "crl.pem"), (peer_ca, tmp_path / "peer-crl.pem")):
        pki.write_public(crl_file, pki.crl_pem(pki.build_crl(ca, [], 1, now)))
    settings = Settings(
        HOME,
        TLSConfig(d / "ca.pem", d / "node.pem", d / "node.key", crl_file=d / "crl.pem"),
        (
            PeerConfig(
                PEER,
                "127.0.0.1:1",
                tmp_path / "peer-ca.pem",
                node_server_name(PEER),
                crl_file=tmp_path / "peer-crl.pem",
            ),
        ),
    )
    return World(
        now, settings, TrustStore(settings), home_ca, peer_ca, pki.create_ca(STRANGER, now)
    )


def pem(ca: pki.KeyPair, ident: Identity, now: datetime, days: int = 1) -> bytes:
    return pki.issue(ca, ident, now, days).cert_pem()


def auth_context(leaf_pem: bytes, tls: bytes = b"TLSv1.3") -> AuthContext:
    """What ``context.auth_context()`` holds for a mutual-TLS call (see the module docstring)."""
    return {
        "transport_security_type": [b"ssl"],
        "x509_pem_cert": [leaf_pem],
        "ssl_tls_version": [tls],
    }


def judge(verifier: CallerVerifier, auth: AuthContext, now: datetime, minimum: str) -> Identity:
    """The two checks the guard makes with a call's auth context (broker/node/guard.py)."""
    check_tls_version(auth.get("ssl_tls_version"), minimum)
    return verifier.identify(auth["x509_pem_cert"][0], now)


def crafted(
    signer: pki.KeyPair | None,
    names: list[x509.GeneralName] | None,
    now: datetime,
) -> bytes:
    """A leaf with exactly these SANs (none when ``None``), signed by ``signer`` or by itself."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "crafted")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer.cert.subject if signer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
    )
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(signer.key if signer else key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM)


def uri(value: str) -> x509.GeneralName:
    return x509.UniformResourceIdentifier(value)


# ----------------------------------------------------------------------------- accepted


def test_a_peer_node_certificate_from_the_peers_ca_is_that_peers_node(world: World):
    v = CallerVerifier(world.store)
    got = judge(
        v, auth_context(pem(world.peer_ca, node_identity(PEER), world.now)), world.now, "1.3"
    )
    assert got == Identity(PEER, Role.NODE)


def test_an_own_operator_certificate_is_that_operator(world: World):
    v = CallerVerifier(world.store)
    leaf = pem(world.home_ca, operator_identity(HOME, "bus-01"), world.now)
    assert v.identify(leaf, world.now) == Identity(HOME, Role.OPERATOR, "bus-01")


def test_tls_12_is_accepted_when_the_minimum_is_12(world: World):
    v = CallerVerifier(world.store)
    leaf = pem(world.peer_ca, node_identity(PEER), world.now)
    assert judge(v, auth_context(leaf, b"TLSv1.2"), world.now, "1.2").district == PEER


def test_either_ca_of_a_district_in_rotation_vouches_for_it(world: World, now: datetime):
    """While two CAs overlap, a certificate of the second must not be refused by the first."""
    second = pki.create_ca(HOME, now)
    pki.write_public(world.settings.tls.ca_file, world.home_ca.cert_pem() + second.cert_pem())
    assert world.store.reload()  # a CA without a revocation list is not trusted yet:
    assert "no revocation list of CA" in world.store.current.problems[HOME]
    assert len(world.store.current.anchors[HOME]) == 1  # the last good set stays
    crls = [pki.build_crl(world.home_ca, [], 2, now), pki.build_crl(second, [], 1, now)]
    pki.write_public(world.settings.tls.crl_file, b"".join(pki.crl_pem(c) for c in crls))
    assert world.store.reload()
    assert HOME not in world.store.current.problems
    v = CallerVerifier(world.store)
    for ca in (world.home_ca, second):
        leaf = pem(ca, operator_identity(HOME, "bus-01"), now)
        assert v.identify(leaf, now).operator_id == "bus-01"


def test_a_non_spiffe_uri_beside_the_one_spiffe_id_is_ignored(world: World, now: datetime):
    leaf = crafted(
        world.home_ca,
        [uri("https://example.org/x"), uri(node_identity(HOME).spiffe_id)],
        now,
    )
    assert CallerVerifier(world.store).identify(leaf, now) == node_identity(HOME)


# ----------------------------------------------------------------------------- refused: whose CA


def test_a_ca_cannot_vouch_for_another_district(world: World, now: datetime):
    """Home's CA minting a certificate that names the peer is refused, and the other way round."""
    v = CallerVerifier(world.store)
    forged_peer = pem(world.home_ca, node_identity(PEER), now)
    with pytest.raises(PermissionDenied, match=f"names district {PEER} but was not issued"):
        v.identify(forged_peer, now)
    forged_operator = pem(world.peer_ca, operator_identity(HOME, "bus-01"), now)
    with pytest.raises(PermissionDenied, match=f"names district {HOME} but was not issued"):
        v.identify(forged_operator, now)


def test_a_district_that_is_not_trusted_is_refused(world: World, now: datetime):
    v = CallerVerifier(world.store)
    with pytest.raises(PermissionDenied, match=f"district {STRANGER} is not trusted"):
        v.identify(pem(world.stranger_ca, node_identity(STRANGER), now), now)


def test_a_self_signed_certificate_naming_a_trusted_district_is_refused(
    world: World, now: datetime
):
    leaf = crafted(None, [uri(node_identity(HOME).spiffe_id)], now)
    with pytest.raises(PermissionDenied, match="not issued by its CA"):
        CallerVerifier(world.store).identify(leaf, now)


# ----------------------------------------------------------------------------- refused: revoked


def test_a_revoked_certificate_is_refused_and_its_siblings_are_not(world: World, now: datetime):
    revoked = pki.issue(world.home_ca, operator_identity(HOME, "bus-01"), now)
    sibling = pem(world.home_ca, operator_identity(HOME, "bus-02"), now)
    assert world.settings.tls.crl_file is not None
    world.revoke(world.home_ca, world.settings.tls.crl_file, revoked.cert.serial_number)
    v = CallerVerifier(world.store)
    with pytest.raises(PermissionDenied, match="has been revoked"):
        v.identify(revoked.cert_pem(), now)
    assert v.identify(sibling, now).operator_id == "bus-02"


def test_a_peer_node_revoked_by_its_own_districts_list_is_refused(world: World, now: datetime):
    peer_node = pki.issue(world.peer_ca, node_identity(PEER), now)
    crl_file = world.settings.peers[0].crl_file
    assert crl_file is not None
    world.revoke(world.peer_ca, crl_file, peer_node.cert.serial_number)
    with pytest.raises(PermissionDenied, match="revoked"):
        CallerVerifier(world.store).identify(peer_node.cert_pem(), now)


def test_a_revocation_after_a_cached_verdict_takes_effect_on_the_next_generation(
    world: World, now: datetime
):
    leaf = pki.issue(world.home_ca, operator_identity(HOME, "bus-01"), now)
    v = CallerVerifier(world.store)
    assert v.identify(leaf.cert_pem(), now).operator_id == "bus-01"  # judged and cached
    assert world.settings.tls.crl_file is not None
    world.revoke(world.home_ca, world.settings.tls.crl_file, leaf.cert.serial_number)
    with pytest.raises(PermissionDenied, match="revoked"):
        v.identify(leaf.cert_pem(), now)


# ----------------------------------------------------------------------------- refused: names


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (None, "exactly one"),  # no SAN extension
        ([x509.DNSName("node.500111.yikatong.cy")], "exactly one"),  # DNS name only
        ([uri("https://500111.yikatong.cy/node")], "exactly one"),  # a URI, but not SPIFFE
        (
            [
                uri("spiffe://500111.yikatong.cy/node"),
                uri("spiffe://500111.yikatong.cy/operator/bus-01"),
            ],
            "exactly one",
        ),
        ([uri("spiffe://500111.yikatong.cy/admin")], "not a yikatong identity"),
        ([uri("spiffe://500111.yikatong.cy/node/")], "not a yikatong identity"),
        ([uri("spiffe://500111.example.org/node")], "not a yikatong identity"),
        ([uri("spiffe://500111.yikatong.cy/operator/BUS")], "not a yikatong identity"),
    ],
)
def test_a_certificate_without_exactly_one_good_spiffe_id_is_refused(
    world: World, now: datetime, names: list[x509.GeneralName] | None, message: str
):
    """Even when the district's own CA signed it."""
    leaf = crafted(world.home_ca, names, now)
    with pytest.raises(PermissionDenied, match=message):
        CallerVerifier(world.store).identify(leaf, now)


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"not a certificate",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        b"\x30\x82\x01\x00" + bytes(200),
    ],
)
def test_bytes_that_are_no_pem_certificate_are_unauthenticated(world: World, garbage: bytes):
    with pytest.raises(Unauthenticated, match="cannot be parsed"):
        CallerVerifier(world.store).identify(garbage, world.now)


def test_a_der_certificate_is_not_taken_for_pem(world: World, now: datetime):
    leaf = pki.issue(world.home_ca, node_identity(HOME), now).cert
    with pytest.raises(Unauthenticated):
        CallerVerifier(world.store).identify(leaf.public_bytes(serialization.Encoding.DER), now)


# ----------------------------------------------------------------------------- validity period


def test_the_validity_period_is_inclusive_at_both_ends(world: World, now: datetime):
    leaf = pki.issue(world.home_ca, operator_identity(HOME, "bus-01"), now, days=1).cert
    leaf_pem = leaf.public_bytes(serialization.Encoding.PEM)
    v = CallerVerifier(world.store)
    second = timedelta(seconds=1)
    assert v.identify(leaf_pem, leaf.not_valid_before_utc).operator_id == "bus-01"
    assert v.identify(leaf_pem, leaf.not_valid_after_utc).operator_id == "bus-01"
    for outside in (leaf.not_valid_before_utc - second, leaf.not_valid_after_utc + second):
        with pytest.raises(Unauthenticated, match="outside its validity period"):
            v.identify(leaf_pem, outside)


def test_a_cached_verdict_still_expires_with_its_certificate(world: World, now: datetime):
    leaf = pem(world.peer_ca, node_identity(PEER), now, days=1)
    v = CallerVerifier(world.store)
    assert v.identify(leaf, now).district == PEER
    with pytest.raises(Unauthenticated):
        v.identify(leaf, now + timedelta(days=2))
    assert v.identify(leaf, now).district == PEER  # and the clock alone decided


def test_a_naive_clock_is_an_error_not_a_pass(world: World, now: datetime):
    leaf = pem(world.peer_ca, node_identity(PEER), now)
    with pytest.raises(TypeError):
        CallerVerifier(world.store).identify(leaf, now.replace(tzinfo=None))


# ----------------------------------------------------------------------------- verdict cache


def test_each_certificate_is_verified_once_per_generation_and_the_cache_is_bounded(
    world: World, now: datetime, monkeypatch: pytest.MonkeyPatch
):
    verified: list[bytes] = []
    real = CallerVerifier._verify

    def counting(self: CallerVerifier, leaf_pem: bytes, snap: Any) -> Any:
        verified.append(leaf_pem)
        return real(self, leaf_pem, snap)

    monkeypatch.setattr(CallerVerifier, "_verify", counting)
    a, b, c = (pem(world.home_ca, operator_identity(HOME, f"op-{i}"), now) for i in range(3))
    v = CallerVerifier(world.store, max_cached=2)
    v.identify(a, now)
    v.identify(a, now)
    assert verified == [a]
    v.identify(b, now)
    v.identify(c, now)  # a third entry pushes out the first
    v.identify(a, now)
    assert verified == [a, b, c, a]
    pki.write_public(world.settings.tls.ca_file, world.home_ca.cert_pem() + b"\n")
    assert world.store.reload()  # a new generation: every verdict is judged afresh
    v.identify(c, now)
    assert verified == [a, b, c, a, c]


# ----------------------------------------------------------------------------- TLS version


@pytest.mark.parametrize(
    ("negotiated", "minimum", "ok"),
    [
        ([b"TLSv1.3"], "1.3", True),
        ([b"TLSv1.3"], "1.2", True),
        ([b"TLSv1.2"], "1.2", True),
        ([b"TLSv1.2"], "1.3", False),
        ([b"TLSv1.1"], "1.2", False),
        ([b"TLSv1"], "1.2", False),
        ([b"SSLv3"], "1.2", False),
        ([b"tlsv1.3"], "1.3", False),  # not a name gRPC reports: unknown is refused
        ([b""], "1.2", False),
        ([], "1.2", False),
        (None, "1.2", False),
    ],
)
def test_a_call_below_the_minimum_tls_version_is_refused(
    negotiated: list[bytes] | None, minimum: str, ok: bool
):
    if ok:
        check_tls_version(negotiated, minimum)
        return
    with pytest.raises(PermissionDenied, match=re.escape(f"below the minimum TLS {minimum}")):
        check_tls_version(negotiated, minimum)


def test_the_refusal_names_the_version_that_was_used():
    with pytest.raises(PermissionDenied, match=r"TLS version TLSv1\.2 is below"):
        check_tls_version([b"TLSv1.2"], "1.3")
    with pytest.raises(PermissionDenied, match="TLS version unknown is below"):
        check_tls_version(None, "1.3")


def test_a_tls_12_call_with_a_good_certificate_is_refused_when_13_is_required(world: World):
    leaf = pem(world.peer_ca, node_identity(PEER), world.now)
    v = CallerVerifier(world.store)
    with pytest.raises(PermissionDenied, match="below the minimum"):
        judge(v, auth_context(leaf, b"TLSv1.2"), world.now, "1.3")


# ----------------------------------------------------------------------------- SANs, server side


def test_spiffe_ids_lists_only_spiffe_uris(world: World, now: datetime):
    def ids(leaf_pem: bytes) -> list[str]:
        return spiffe_ids(x509.load_pem_x509_certificate(leaf_pem))

    assert ids(crafted(world.home_ca, None, now)) == []
    mixed = [
        uri("https://example.org"),
        x509.DNSName("spiffe.example"),
        uri("spiffe://a/b"),
        uri("spiffe://c/d"),
    ]
    assert ids(crafted(world.home_ca, mixed, now)) == ["spiffe://a/b", "spiffe://c/d"]
    assert ids(pem(world.home_ca, node_identity(HOME), now)) == [node_identity(HOME).spiffe_id]


def test_server_certificates_are_offered_again_only_after_a_reload(world: World, now: datetime):
    certs = ServerCertificates(world.store)
    assert certs.credentials() is not None
    assert certs.fetch() is None  # nothing changed since the credentials were made
    renewed = pki.issue(world.home_ca, node_identity(HOME), now)
    pki.save(renewed, world.settings.tls.cert_file, world.settings.tls.key_file)
    assert world.store.reload()
    assert certs.fetch() is not None  # the next handshake gets the new certificate
    assert certs.fetch() is None  # and only once
