"""Trust.GetBundle's servicer (broker/node/trust_api.py): the district's signed trust bundle.

Through a running node for what peers receive; the servicer alone (no caller needed: it
reads no identity) for a node that publishes no bundle or cannot read it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from broker._proto.yikatong.v1 import trust_pb2, trust_pb2_grpc
from broker.core.errors import ConfigError
from broker.node.trust_api import TrustServicer
from broker.trust import certops
from broker.trust.bundle import Bundle, SignedBundle, read_served, served_path, verify
from tests.conftest import ANYUE, DAZU, Cluster
from tests.helpers import node_channel

NO_CONTEXT = cast(Any, None)  # GetBundle does not use its context


async def test_a_peer_gets_the_districts_bundle_signed_by_its_ca(cluster: Cluster) -> None:
    dazu = cluster.setups[DAZU]
    ch = node_channel(cluster.nodes[DAZU].address, dazu, cluster.setups[ANYUE])
    try:
        got = await trust_pb2_grpc.TrustStub(ch).GetBundle(trust_pb2.GetBundleRequest(), timeout=5)
    finally:
        await ch.close()
    on_disk = SignedBundle.from_json(dazu.paths.bundle.read_bytes())
    assert (got.document, got.signer, got.signature) == (
        on_disk.document,
        on_disk.signer,
        on_disk.signature,
    )
    ca = certops.active_ca(dazu.paths).cert
    bundle = verify(SignedBundle(got.document, got.signer, got.signature), DAZU, [ca], 0)
    assert bundle.district == DAZU and bundle.sequence >= 1
    assert bundle.settlement_keys  # what peers need to check Dazu's settlement documents


async def test_the_bundle_file_is_read_afresh_on_every_call(tmp_path: Path) -> None:
    """A bundle republished (a rotation, a revocation) is served without a restart."""
    path = tmp_path / "bundle.json"
    first = SignedBundle(b'{"sequence":1}', "ca-1", b"sig-1")
    path.write_bytes(first.to_json())
    servicer = TrustServicer(path)
    got = await servicer.GetBundle(trust_pb2.GetBundleRequest(), NO_CONTEXT)
    assert (got.document, got.signer, got.signature) == (b'{"sequence":1}', "ca-1", b"sig-1")
    path.write_bytes(SignedBundle(b'{"sequence":2}', "ca-2", b"sig-2").to_json())
    again = await servicer.GetBundle(trust_pb2.GetBundleRequest(), NO_CONTEXT)
    assert (again.document, again.signer, again.signature) == (b'{"sequence":2}', "ca-2", b"sig-2")


async def test_a_node_without_a_bundle_file_is_a_config_error_naming_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"\[trust\] bundle_file"):
        await TrustServicer(None).GetBundle(trust_pb2.GetBundleRequest(), NO_CONTEXT)


async def test_an_unreadable_bundle_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        await TrustServicer(tmp_path / "absent.json").GetBundle(
            trust_pb2.GetBundleRequest(), NO_CONTEXT
        )
    with pytest.raises(ConfigError, match="cannot be read"):
        await TrustServicer(tmp_path).GetBundle(trust_pb2.GetBundleRequest(), NO_CONTEXT)


async def test_through_the_node_a_missing_bundle_is_failed_precondition(cluster: Cluster) -> None:
    """What a peer sees when the file went missing: FAILED_PRECONDITION, not a crash."""
    dazu = cluster.setups[DAZU]
    dazu.paths.bundle.rename(dazu.paths.bundle.with_suffix(".moved"))
    ch = node_channel(cluster.nodes[DAZU].address, dazu, cluster.setups[ANYUE])
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await trust_pb2_grpc.TrustStub(ch).GetBundle(trust_pb2.GetBundleRequest(), timeout=5)
    finally:
        await ch.close()
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot be read" in (info.value.details() or "")


async def test_which_bundle_each_peer_fetched_is_noted_beside_it(cluster: Cluster) -> None:
    """What ``broker trust status`` and a CA rotation's activate stage read."""
    dazu = cluster.setups[DAZU]
    sequence = Bundle.parse(SignedBundle.from_json(dazu.paths.bundle.read_bytes()).document)
    ch = node_channel(cluster.nodes[DAZU].address, dazu, cluster.setups[ANYUE])
    try:
        await trust_pb2_grpc.TrustStub(ch).GetBundle(trust_pb2.GetBundleRequest(), timeout=5)
    finally:
        await ch.close()
    served = read_served(dazu.paths.bundle)
    assert served[ANYUE][0] == sequence.sequence
    assert DAZU not in served  # its own node fetching is not a peer having seen it


async def test_a_served_record_that_cannot_be_written_does_not_fail_the_fetch(
    cluster: Cluster,
) -> None:
    dazu = cluster.setups[DAZU]
    served_path(dazu.paths.bundle).mkdir()  # a directory where the record goes
    ch = node_channel(cluster.nodes[DAZU].address, dazu, cluster.setups[ANYUE])
    try:
        got = await trust_pb2_grpc.TrustStub(ch).GetBundle(trust_pb2.GetBundleRequest(), timeout=5)
    finally:
        await ch.close()
    assert got.document == SignedBundle.from_json(dazu.paths.bundle.read_bytes()).document
