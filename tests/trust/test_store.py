"""Trust material on a running node: reloads, revocation, refusing what does not hold together."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from broker.cards.model import CardRef, Scene
from broker.core.errors import ConfigError, PermissionDenied
from broker.testbed.build import DistrictSetup
from broker.trust import certops, pki
from broker.trust.bundle import Bundle, sign
from broker.trust.config import PeerConfig
from broker.trust.identity import node_identity, operator_identity
from broker.trust.store import CRL_HEALTH, TrustStore, peer_health_name
from broker.trust.tls import CallerVerifier, check_tls_version
from tests.conftest import ANYUE, DAZU, RONGCHANG, Cluster
from tests.core.test_watch import replace_keeping_size_and_mtime
from tests.helpers import node_channel, recognition_stub, recognize_request
from tests.trust.test_revocation import ca_without_ski, hand_built

PROPAGATION_S = 5.0  # the issue's bound for a change to take effect on a running node


async def until_refused(call: Callable[[], Awaitable[object]]) -> grpc.aio.AioRpcError:
    """Repeat ``call`` until it fails; fail the test if it still succeeds after the bound."""
    deadline = time.monotonic() + PROPAGATION_S
    while True:
        try:
            await call()
        except grpc.aio.AioRpcError as exc:
            return exc
        assert time.monotonic() < deadline, "change did not take effect within 5 s"
        await asyncio.sleep(0.1)


def serial_of(path) -> str:
    return f"{x509.load_pem_x509_certificate(path.read_bytes()).serial_number:x}"


async def test_a_revoked_operator_is_refused_by_its_own_node_within_5_s(cluster: Cluster, now):
    s = cluster.setups[DAZU]
    gate = cluster.gate(DAZU)
    card = CardRef(DAZU, "C5001110000001")
    await gate.check(card, Scene.BUS)  # fine before
    certops.revoke(s.paths, serial_of(s.operator_cert), now)
    err = await until_refused(lambda: gate.check(card, Scene.BUS))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "revoked" in err.details()


async def test_a_revoked_node_is_refused_by_its_peer_after_refresh(cluster: Cluster, now):
    dazu, anyue = cluster.setups[DAZU], cluster.setups[ANYUE]
    ch = node_channel(cluster.nodes[ANYUE].address, anyue, dazu)
    stub = recognition_stub(ch)
    card = CardRef(ANYUE, anyue.cards[0].ref.card_number)
    try:
        await stub.Recognize(recognize_request(card), timeout=5)
        certops.revoke(dazu.paths, serial_of(dazu.paths.node_cert), now)
        err = await until_refused(lambda: stub.Recognize(recognize_request(card), timeout=5))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await ch.close()


async def test_a_renewed_node_certificate_is_served_without_restart(cluster: Cluster, now):
    s = cluster.setups[DAZU]
    node = cluster.nodes[DAZU]
    before = node.trust.current
    certops.issue_to_files(s.paths, node_identity(DAZU), now)
    node.request_reload()  # what SIGHUP does; the timer would find it within a second too
    deadline = time.monotonic() + PROPAGATION_S
    while node.trust.current.generation == before.generation:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert node.trust.current.cert_chain_pem == s.paths.node_cert.read_bytes()
    # A new connection sees the new certificate, and calls still succeed.
    gate = cluster.gate(DAZU)
    d = await gate.check(CardRef(DAZU, "C5001110000001"), Scene.BUS)
    assert d.source == 1


def test_a_key_not_matching_its_certificate_is_refused_and_the_last_good_kept(districts, now):
    s = districts[DAZU]
    store = TrustStore(s.config)
    good = store.current
    other = pki.issue(certops.active_ca(s.paths), node_identity(DAZU), now)
    pki.write_private(s.paths.node_key, other.key_pem())  # the key of a rotation, not its cert yet
    assert store.reload() is False
    assert store.current is good
    pki.write_public(s.paths.node_cert, other.cert_pem())  # the rotation completes
    assert store.reload() is True
    assert store.current.generation == good.generation + 1


def test_a_certificate_replaced_by_rename_with_the_same_size_and_mtime_is_noticed(districts):
    """``rsync -t`` of a renewal of equal length: only the inode tells; the store must notice."""
    s = districts[DAZU]
    store = TrustStore(s.config)
    assert not store.changed()
    replace_keeping_size_and_mtime(s.paths.node_cert, s.paths.node_cert.read_bytes())
    assert store.changed()
    store.reload()
    assert not store.changed()


def test_a_revocation_list_not_signed_by_its_ca_is_refused(districts, now):
    s = districts[DAZU]
    store = TrustStore(s.config)
    rogue = pki.create_ca(DAZU, now)
    real = certops.active_ca(s.paths)
    # Names the real CA and carries its key id, but is signed by another key.
    ski = real.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    forged = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(real.cert.subject)
        .last_update(now)
        .next_update(now + timedelta(days=1))
        .add_extension(x509.AuthorityKeyIdentifier(ski.digest, None, None), critical=False)
        .add_extension(x509.CRLNumber(10_000), critical=False)  # newer than any real one
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(123).revocation_date(now).build()
        )
        .sign(rogue.key, hashes.SHA256())
    )
    before = store.current.revoked
    pki.write_public(s.paths.crl, pki.crl_pem(forged))
    store.reload()  # takes effect only as a reported problem: the last good lists stay
    assert (pki.ca_id(real.cert), 123) not in store.current.revoked
    assert store.current.revoked == before
    assert "not signed by CA" in store.current.problems[DAZU]
    assert store.health()["yikatong.trust.crl"] is False


def test_tls_below_the_minimum_is_refused_per_call():
    check_tls_version([b"TLSv1.3"], "1.3")
    check_tls_version([b"TLSv1.3"], "1.2")
    check_tls_version([b"TLSv1.2"], "1.2")
    for negotiated in ([b"TLSv1.2"], None, [b"SSLv3"]):
        with pytest.raises(PermissionDenied, match="below the minimum"):
            check_tls_version(negotiated, "1.3")


async def test_health_fails_while_the_nodes_own_certificate_is_expired(tmp_path, now):
    from datetime import timedelta as td

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from broker.node.server import Node
    from broker.testbed import build as testbed
    from tests.helpers import channel

    setups = testbed.build(tmp_path, (DAZU,), now, cards_per_district=1, reload_interval_ms=100)
    s = setups[DAZU]
    certops.issue_to_files(s.paths, node_identity(DAZU), now, days=1)  # operator's: 30 days
    clock = [now]
    node = await Node.start(s.config, clock=lambda: clock[0])
    ch = channel(
        node.address,
        DAZU,
        s.paths.ca_cert.read_bytes(),
        s.operator_cert.read_bytes(),
        s.operator_key.read_bytes(),
    )
    try:
        stub = health_pb2_grpc.HealthStub(ch)
        req = health_pb2.HealthCheckRequest(service="")
        assert (await stub.Check(req, timeout=5)).status == health_pb2.HealthCheckResponse.SERVING
        clock[0] = node.trust.current.not_after + td(seconds=1)  # time passes the node's expiry
        deadline = time.monotonic() + PROPAGATION_S
        while (
            await stub.Check(req, timeout=5)
        ).status != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "health still SERVING with an expired certificate"
            await asyncio.sleep(0.1)
    finally:
        await ch.close()
        await node.stop(grace=0)


# ----------------------------------------------------------------------------- failing closed
# What is revoked stays refused, whatever happens to the files (issue 10, item 1).


def cert_serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def assert_refused_as_revoked(store: TrustStore, cert: Path, now: datetime) -> None:
    """A fresh verifier (as after a reload) refuses ``cert`` as revoked."""
    with pytest.raises(PermissionDenied, match="has been revoked"):
        CallerVerifier(store).identify(cert.read_bytes(), now)


def damage_crl(kind: str, crl: Path, older: bytes, foreign: bytes) -> None:
    """Do to ``crl`` what a file accident does: each ``kind`` is one accident."""
    if kind == "deleted":  # rm, or rsync --delete-after between two runs
        crl.unlink()
    elif kind == "zero bytes":  # a copy just started, a full disk
        pki.write_public(crl, b"")
    elif kind == "PEM-less":  # an error page saved in its place
        pki.write_public(crl, b"<html>502 Bad Gateway</html>\n")
    elif kind == "foreign CA":  # a neighbour's list copied by mistake
        pki.write_public(crl, foreign)
    elif kind == "older list":  # a backup from before the revocation put back
        pki.write_public(crl, older)
    else:
        raise AssertionError(kind)


ACCIDENTS = [
    ("deleted", "cannot be read"),
    ("zero bytes", "holds no revocation list"),
    ("PEM-less", "holds no revocation list"),
    ("foreign CA", f"not a trust anchor of {DAZU}"),
    ("older list", "older than number 2, already accepted"),
]


@pytest.mark.parametrize(("accident", "message"), ACCIDENTS, ids=[a for a, _ in ACCIDENTS])
def test_a_revocation_in_force_stays_in_force_whatever_happens_to_crl_pem(
    districts, now, accident: str, message: str
):
    s = districts[DAZU]
    store = TrustStore(s.config)
    CallerVerifier(store).identify(s.operator_cert.read_bytes(), now)  # accepted before
    older = s.paths.crl.read_bytes()
    second_cert, _ = certops.issue_to_files(s.paths, operator_identity(DAZU, "transit-02"), now)
    certops.revoke(s.paths, serial_of(s.operator_cert), now)  # list number 2
    revoked_list = s.paths.crl.read_bytes()
    assert store.reload() is True
    assert_refused_as_revoked(store, s.operator_cert, now)
    assert DAZU not in store.current.problems and store.health()[CRL_HEALTH] is True

    damage_crl(accident, s.paths.crl, older, districts[ANYUE].paths.crl.read_bytes())
    store.reload()
    assert_refused_as_revoked(store, s.operator_cert, now)
    assert store.current.trusted(DAZU)
    assert message in store.current.problems[DAZU]
    assert store.health()[CRL_HEALTH] is False

    # Put right: the genuine list back, and a later revocation on top of it (number 3).
    pki.write_public(s.paths.crl, revoked_list)
    certops.revoke(s.paths, serial_of(second_cert), now)
    assert store.reload() is True
    (in_force,) = store.current.districts[DAZU].crls.values()
    assert in_force.number == 3
    assert_refused_as_revoked(store, s.operator_cert, now)
    assert_refused_as_revoked(store, second_cert, now)
    assert DAZU not in store.current.problems
    assert store.health()[CRL_HEALTH] is True


def test_a_restart_does_not_take_back_an_older_list(districts, now):
    """The highest number accepted is kept in ``trust.crl_state_file`` across restarts."""
    s = districts[DAZU]
    state = s.config.trust.crl_state_file
    assert state is not None and state.parent.name == DAZU  # var/<code>/crl-state
    store = TrustStore(s.config)
    older = s.paths.crl.read_bytes()
    certops.revoke(s.paths, serial_of(s.operator_cert), now)
    assert store.reload() is True
    pki.write_public(s.paths.crl, older)  # the node is stopped and a backup put back

    with pytest.raises(ConfigError, match=r"older than number 2.*and none is in force"):
        TrustStore(s.config)
    # What the state file prevents: a node without it would start with the revocation gone.
    forgetful = replace(s.config, trust=replace(s.config.trust, crl_state_file=None))
    ca = certops.active_ca(s.paths).cert
    assert not TrustStore(forgetful).current.is_revoked(ca, cert_serial(s.operator_cert))
    # Revoking again on top of the older file: certops numbers the next list from the
    # newest it knows (the bundle still holds number 2), so the node starts, revocation held.
    later = now + timedelta(minutes=1)
    certops.revoke(s.paths, serial_of(s.operator_cert), later)  # number 3
    assert_refused_as_revoked(TrustStore(s.config), s.operator_cert, now)


@pytest.mark.parametrize(("accident", "message"), ACCIDENTS[:4], ids=[a for a, _ in ACCIDENTS[:4]])
def test_a_node_whose_own_crl_is_unusable_at_start_does_not_start(
    districts, accident: str, message: str
):
    s = districts[DAZU]
    damage_crl(accident, s.paths.crl, b"", districts[ANYUE].paths.crl.read_bytes())
    with pytest.raises(ConfigError, match=message) as info:
        TrustStore(s.config)
    assert str(s.paths.crl) in str(info.value)


def test_a_peer_whose_crl_file_is_missing_at_start_is_not_trusted_and_the_others_are(
    districts, now, tmp_path: Path
):
    s, anyue = districts[DAZU], districts[ANYUE]
    crl_file = tmp_path / "peer-lists" / f"{ANYUE}.crl.pem"  # not there (yet)
    peers = tuple(
        PeerConfig(p.district, p.address, anyue.paths.ca_cert, p.server_name, crl_file=crl_file)
        if p.district == ANYUE
        else p
        for p in s.config.peers
    )
    cfg = replace(s.config, peers=peers)
    store = TrustStore(cfg)
    snap = store.current
    assert not snap.trusted(ANYUE) and snap.trusted(RONGCHANG) and snap.trusted(DAZU)
    assert "revocation list" in snap.problems[ANYUE] and "cannot be read" in snap.problems[ANYUE]
    assert ANYUE not in snap.peer_roots_pem
    assert anyue.paths.ca_cert.read_bytes() not in snap.client_roots_pem
    assert store.health() == {
        CRL_HEALTH: True,
        peer_health_name(ANYUE): False,
        peer_health_name(RONGCHANG): True,
    }
    with pytest.raises(PermissionDenied, match=f"district {ANYUE} is not trusted"):
        CallerVerifier(store).identify(anyue.paths.node_cert.read_bytes(), now)
    CallerVerifier(store).identify(districts[RONGCHANG].paths.node_cert.read_bytes(), now)

    pki.write_public(crl_file, anyue.paths.crl.read_bytes())  # the file arrives
    assert store.reload() is True
    assert store.current.trusted(ANYUE) and ANYUE not in store.current.problems
    assert store.health()[peer_health_name(ANYUE)] is True
    CallerVerifier(store).identify(anyue.paths.node_cert.read_bytes(), now)


def test_a_lapsed_list_fails_crl_health_but_its_revocations_stay_enforced(districts, now):
    s = districts[DAZU]
    clock = [now]
    store = TrustStore(s.config, clock=lambda: clock[0])
    certops.revoke(s.paths, serial_of(s.operator_cert), now)
    assert store.reload() is True
    assert store.health()[CRL_HEALTH] is True
    (own,) = store.current.districts[DAZU].crls.values()
    assert own.next_update is not None

    clock[0] = own.next_update + timedelta(seconds=1)  # renew-due did not run for 7 days
    assert store.health()[CRL_HEALTH] is False
    assert_refused_as_revoked(store, s.operator_cert, clock[0])
    store.reload()  # what the node's tick does then (its peers' bundles are too old by now)
    assert store.current.trusted(DAZU) and DAZU not in store.current.problems
    assert store.health()[CRL_HEALTH] is False
    assert_refused_as_revoked(store, s.operator_cert, clock[0])


def test_a_lapsed_list_written_with_a_higher_number_takes_effect_and_is_reported(districts, now):
    """Lapsed is a warning, never a reason to drop what the list revokes; renew-due mends it."""
    s = districts[DAZU]
    store = TrustStore(s.config)
    ca = certops.active_ca(s.paths)
    serial = cert_serial(s.operator_cert)
    lapsed = pki.build_crl(ca, [(serial, now)], 2, now - timedelta(days=2), days=1)
    pki.write_public(s.paths.crl, pki.crl_pem(lapsed))
    assert store.reload() is True
    assert_refused_as_revoked(store, s.operator_cert, now)
    assert DAZU not in store.current.problems
    health = store.health()
    assert health[CRL_HEALTH] is False
    assert health[peer_health_name(ANYUE)] is True  # only the lapsed list is at fault

    renewal = certops.renew_due(s.paths, now)  # the timer
    assert renewal.crls == (pki.ca_id(ca.cert),)
    assert store.reload() is True
    assert store.health()[CRL_HEALTH] is True
    assert_refused_as_revoked(store, s.operator_cert, now)


# ----------------------------------------------------------------------------- peer bundles
# Loading a peer's bundle raises nothing but the project's own errors (issue 10, item 4).


def unusable_bundle(kind: str, peer: DistrictSetup, now: datetime) -> bytes:
    """The file a peer's held bundle could become: each ``kind`` is one way to be unusable.

    All but the first are properly signed by the peer's CA, with a sequence above what it
    published: only their content is at fault.
    """
    if kind == "not JSON":
        return b'{"document": "eyJkaXN0cmljdCI6'  # a copy cut off
    ca = certops.active_ca(peer.paths)
    published = certops.read_bundle(peer.paths.bundle)
    assert published is not None
    held = Bundle.parse(published.document)
    if kind == "list without AKI":  # what `openssl ca -gencrl` writes by default
        crl = hand_built(ca, now, aki=False, number=50).decode()
        doc = dataclasses.replace(held, crls_pem=(crl,))
    elif kind == "CA without SKI":
        extra = ca_without_ski(peer.code, now)
        crl = pki.crl_pem(pki.build_crl(extra, [], 1, now)).decode()
        doc = dataclasses.replace(
            held, cas_pem=(*held.cas_pem, extra.cert_pem().decode()), crls_pem=(*held.crls_pem, crl)
        )
    elif kind == "CA that does not parse":
        doc = dataclasses.replace(held, cas_pem=(*held.cas_pem, "-----BEGIN CERTIFICATE-----\n"))
    else:
        raise AssertionError(kind)
    return sign(dataclasses.replace(doc, sequence=held.sequence + 1), ca).to_json()


UNUSABLE = ["not JSON", "list without AKI", "CA without SKI", "CA that does not parse"]


def peer_bundle_file(s: DistrictSetup, district: str) -> Path:
    peer = s.config.peer(district)
    assert peer is not None and peer.bundle_file is not None
    return peer.bundle_file


@pytest.mark.parametrize("kind", UNUSABLE)
def test_a_node_starting_with_an_unusable_peer_bundle_leaves_that_peer_untrusted(
    districts, now, kind: str
):
    s = districts[DAZU]
    pki.write_public(peer_bundle_file(s, ANYUE), unusable_bundle(kind, districts[ANYUE], now))
    store = TrustStore(s.config)  # starts: it is a peer's file, not this node's own
    snap = store.current
    assert not snap.trusted(ANYUE) and snap.trusted(RONGCHANG)
    assert str(peer_bundle_file(s, ANYUE)) in snap.problems[ANYUE]
    assert store.health() == {
        CRL_HEALTH: True,
        peer_health_name(ANYUE): False,
        peer_health_name(RONGCHANG): True,
    }


@pytest.mark.parametrize("kind", UNUSABLE)
def test_a_peer_bundle_turning_unusable_keeps_the_last_good_one_in_force(districts, now, kind: str):
    s = districts[DAZU]
    store = TrustStore(s.config)
    good = store.current.districts[ANYUE]
    pki.write_public(peer_bundle_file(s, ANYUE), unusable_bundle(kind, districts[ANYUE], now))
    store.reload()  # must not raise: an exception here would end the node's trust watcher
    assert store.current.districts[ANYUE] is good
    assert ANYUE in store.current.problems
    assert store.health()[peer_health_name(ANYUE)] is False
    assert store.health()[CRL_HEALTH] is True


# ---------------------------------------------------------------- a stale bundle put back


def test_an_older_peer_bundle_put_back_does_not_bring_back_the_old_pinned_epoch(districts, now):
    """Restore or stale copy of var/peers/<d>.bundle.json: the last good bundle stays in force.

    Found by review: the old bundle's CAs, keys and pinned name came back on reload.
    """
    from cryptography import x509 as _x509

    from broker.trust.config import node_epoch_name
    from broker.trust.identity import node_identity

    dazu, anyue = districts[DAZU], districts[ANYUE]
    peer = dazu.config.peer(ANYUE)
    assert peer is not None and peer.bundle_file is not None
    store = TrustStore(dazu.config)
    old_bundle = peer.bundle_file.read_bytes()
    stolen = _x509.load_pem_x509_certificate(anyue.paths.node_cert.read_bytes()).serial_number
    certops.rotate(anyue.paths, node_identity(ANYUE), now, next_epoch=True)
    certops.publish_epoch(anyue.paths, now)
    certops.revoke(anyue.paths, f"{stolen:x}", now)
    latest = certops.read_bundle(anyue.paths.bundle)
    assert latest is not None
    pki.write_public(peer.bundle_file, latest.to_json())
    assert store.reload()
    assert store.current.node_name(ANYUE) == node_epoch_name(ANYUE, 2)

    pki.write_public(peer.bundle_file, old_bundle)  # the stale copy
    store.reload()
    assert store.current.node_name(ANYUE) == node_epoch_name(ANYUE, 2)  # not back to e1
    assert "older than" in store.current.problems[ANYUE]
    # And a restart with the stale copy still on disk does not take it either.
    again = TrustStore(dazu.config)
    assert again.current.node_name(ANYUE) != node_epoch_name(ANYUE, 1)
    assert not again.current.trusted(ANYUE)


def test_revocation_state_that_cannot_be_written_is_retried_and_reported(
    districts, now, monkeypatch
):
    """A failed write of crl-state: health says so, the next reload writes it, nothing is lost."""
    from broker.trust import revocation

    s = districts[DAZU]
    store = TrustStore(s.config)
    real = pki.write_public
    failing = {"left": 1}

    def flaky(path: Path, data: bytes) -> None:
        if failing["left"]:
            failing["left"] -= 1
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(revocation, "write_public", flaky)
    certops.revoke(s.paths, serial_of(s.operator_cert), now)
    assert store.reload()  # the new list is in force ...
    assert store.health()["yikatong.trust.crl"] is False  # ... but its mark is not saved
    state = s.config.trust.crl_state_file
    assert state is not None
    before = state.read_text()
    certops.renew_due(s.paths, now + timedelta(days=5))  # any later list: a reload after it
    assert store.reload()
    assert state.read_text() != before  # written this time, with the marks raised
    assert store.health()["yikatong.trust.crl"] is True
