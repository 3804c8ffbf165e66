"""Node configuration: TOML in, frozen dataclasses out, env overrides, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.core.errors import ConfigError
from broker.node.config import load_config, render_config

MINIMAL = """
district = "500111"
listen = "127.0.0.1:0"
[tls]
ca_file = "c/ca.pem"
cert_file = "c/node.pem"
key_file = "c/node.key"
[registry]
path = "var/r.sqlite3"
[privacy]
hash_key_file = "c/hash.key"
[[peers]]
district = "512021"
address = "127.0.0.1:5000"
ca_file = "/abs/anyue-ca.pem"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "node.toml"
    p.write_text(text)
    return p


def test_relative_paths_resolve_against_the_config_and_defaults_apply(tmp_path: Path):
    cfg = load_config(write(tmp_path, MINIMAL), env={})
    assert cfg.tls.ca_file == tmp_path / "c" / "ca.pem"
    assert cfg.peers[0].ca_file == Path("/abs/anyue-ca.pem")
    assert cfg.peers[0].server_name == "node.512021.yikatong.cy"
    assert cfg.cache.redis_url is None
    assert cfg.recognition.cache_ttl_seconds == 120
    assert cfg.peer("512021") is cfg.peers[0]
    assert cfg.peer("500153") is None


def test_render_then_load_round_trips(tmp_path: Path):
    cfg = load_config(write(tmp_path, MINIMAL), env={})
    again = load_config(write(tmp_path, render_config(cfg)), env={})
    assert again == cfg


def test_env_overrides(tmp_path: Path):
    env = {
        "YIKATONG_REDIS_URL": "redis://127.0.0.1:1/0",
        "YIKATONG_LISTEN": "0.0.0.0:9",
        "YIKATONG_PEER_DEADLINE_MS": "150",
    }
    cfg = load_config(write(tmp_path, MINIMAL), env=env)
    assert cfg.cache.redis_url == "redis://127.0.0.1:1/0"
    assert cfg.listen == "0.0.0.0:9"
    assert cfg.peer_deadline_ms == 150


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.replace('district = "500111"', 'district = "5001"'), "district"),
        (lambda s: s.replace('listen = "127.0.0.1:0"\n', ""), "listen is required"),
        (lambda s: s.replace('key_file = "c/node.key"\n', ""), "tls.key_file is required"),
        (lambda s: s.replace('"512021"', '"500111"'), "own district"),
        (lambda s: s + "[cache]\nlocal_max_entries = -1\n", "cache.local_max_entries"),
        (lambda s: s + '[[peers]]\ndistrict = "512021"\naddress="x"\nca_file="y"\n', "twice"),
        (lambda s: s.replace("[tls]", "[tls"), "node.toml"),
    ],
)
def test_bad_configs_are_refused_with_the_offending_key(tmp_path: Path, edit, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, edit(MINIMAL)), env={})


def test_missing_file_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", env={})
