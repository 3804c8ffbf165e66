"""Trust material on a running node: reloads, revocation, refusing what does not hold together."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from broker.cards.model import CardRef, Scene
from broker.core.errors import PermissionDenied
from broker.trust import certops, pki
from broker.trust.identity import node_identity
from broker.trust.store import TrustStore
from broker.trust.tls import check_tls_version
from tests.conftest import ANYUE, DAZU, Cluster
from tests.core.test_watch import replace_keeping_size_and_mtime
from tests.helpers import node_channel, recognition_stub, recognize_request

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
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(123).revocation_date(now).build()
        )
        .sign(rogue.key, hashes.SHA256())
    )
    pki.write_public(s.paths.crl, pki.crl_pem(forged))
    assert store.reload() is False
    assert (pki.ca_id(real.cert), 123) not in store.current.revoked


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
