"""The trust concern's configuration: server names, the dataclasses' defaults, the settings view.

Module under test: :mod:`broker.trust.config`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from broker.node.config import NodeConfig, load_config
from broker.trust.config import (
    TLS_VERSIONS,
    PeerConfig,
    TLSConfig,
    TrustConfig,
    TrustSettings,
    node_server_name,
)
from broker.trust.identity import TRUST_DOMAIN_SUFFIX, node_identity
from broker.trust.tls import check_tls_version

CONFIG = """
district = "500111"
listen = "127.0.0.1:0"
[tls]
ca_file = "c/ca.pem"
cert_file = "c/node.pem"
key_file = "c/node.key"
crl_file = "c/crl.pem"
[registry]
path = "var/r.sqlite3"
[privacy]
hash_key_file = "c/hash.key"
[trust]
bundle_file = "c/bundle.json"
bundle_refresh_s = 7
[[peers]]
district = "512021"
address = "127.0.0.1:5000"
bundle_file = "var/peers/512021.bundle.json"
[[peers]]
district = "500153"
address = "127.0.0.1:5001"
ca_file = "rc/ca.pem"
crl_file = "rc/crl.pem"
server_name = "rongchang.example"
"""


def describe(settings: TrustSettings) -> dict[str, object]:
    """A consumer of the protocol, as the trust store and peer channels are (type-checked)."""
    return {
        "district": settings.district,
        "ca": settings.tls.ca_file,
        "peers": [p.district for p in settings.peers],
        "refresh": settings.trust.bundle_refresh_s,
        "anyue": settings.peer("512021"),
    }


@pytest.fixture
def node_config(tmp_path: Path) -> NodeConfig:
    path = tmp_path / "node.toml"
    path.write_text(CONFIG)
    return load_config(path, env={})


def test_a_nodes_server_name_is_under_its_district():
    assert node_server_name("500111") == "node.500111.yikatong.cy"
    assert node_server_name("512021") != node_server_name("500111")


def test_the_server_name_is_the_dns_name_node_certificates_carry():
    """Peers check this name against the node certificate: both must agree for every district."""
    for district in ("100000", "500111", "899999"):
        assert node_server_name(district) == node_identity(district).dns_name
        assert node_server_name(district).endswith(f".{district}.{TRUST_DOMAIN_SUFFIX}")


def test_tls_defaults_require_tls_13_and_recycle_connections(tmp_path: Path):
    tls = TLSConfig(tmp_path / "ca", tmp_path / "cert", tmp_path / "key", tmp_path / "crl")
    assert tls.crl_file == tmp_path / "crl"  # required: no default
    assert tls.min_version == "1.3"
    assert tls.max_connection_age_s == 300
    assert tls.reload_interval_ms == 1000


def test_the_default_minimum_is_one_of_the_allowed_versions(tmp_path: Path):
    tls = TLSConfig(tmp_path / "ca", tmp_path / "cert", tmp_path / "key", tmp_path / "crl")
    assert tls.min_version in TLS_VERSIONS
    assert TLS_VERSIONS == ("1.2", "1.3")


def test_every_allowed_minimum_is_one_the_per_call_check_understands():
    """A configured min_version must never make check_tls_version fail to parse it."""
    for version in TLS_VERSIONS:
        check_tls_version([b"TLSv1.3"], version)


def test_peer_defaults_have_no_crl_and_no_bundle(tmp_path: Path):
    peer = PeerConfig("512021", "127.0.0.1:1", tmp_path / "ca", node_server_name("512021"))
    assert peer.crl_file is None and peer.bundle_file is None


def test_trust_defaults_serve_no_bundle_and_refresh_every_30_s():
    trust = TrustConfig()
    assert trust.bundle_file is None and trust.bundle_refresh_s == 30


def test_the_configuration_dataclasses_are_frozen(tmp_path: Path):
    tls = TLSConfig(tmp_path / "ca", tmp_path / "cert", tmp_path / "key", tmp_path / "crl")
    peer = PeerConfig("512021", "127.0.0.1:1", None, node_server_name("512021"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        tls.min_version = "1.2"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        peer.server_name = "evil.example"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrustConfig().bundle_refresh_s = 1  # type: ignore[misc]


def test_a_loaded_node_config_serves_as_trust_settings(node_config: NodeConfig, tmp_path: Path):
    """``describe`` is typed to take TrustSettings; mypy checks NodeConfig fits, this runs it."""
    got = describe(node_config)
    assert got["district"] == "500111"
    assert got["ca"] == tmp_path / "c" / "ca.pem"
    assert got["peers"] == ["512021", "500153"]
    assert got["refresh"] == 7
    anyue = got["anyue"]
    assert isinstance(anyue, PeerConfig) and anyue.address == "127.0.0.1:5000"


def test_peer_finds_each_configured_peer_with_its_own_settings(node_config: NodeConfig):
    anyue, rongchang = node_config.peer("512021"), node_config.peer("500153")
    assert anyue is not None and rongchang is not None
    assert anyue.server_name == node_server_name("512021")  # the default
    assert anyue.ca_file is None and anyue.bundle_file is not None
    assert rongchang.server_name == "rongchang.example"
    assert rongchang.address == "127.0.0.1:5001" and rongchang.crl_file is not None


@pytest.mark.parametrize("district", ["500111", "500118", "", "512021 "])
def test_peer_is_none_for_a_district_that_is_not_a_peer(node_config: NodeConfig, district: str):
    """Its own district, an unknown one and near misses are not peers."""
    assert node_config.peer(district) is None
