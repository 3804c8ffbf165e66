"""Recognition and cache settings (broker.gate.config): defaults, and that they are frozen."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from broker.cards.model import Scene
from broker.core.errors import ConfigError
from broker.gate.config import (
    OFFLINE_BY_SCENE,
    STALE_BY_SCENE,
    CacheConfig,
    OfflineConfig,
    RecognitionConfig,
    offline_by_scene,
    stale_by_scene,
)
from broker.node.config import parse_config

# A node config without [recognition] or [cache] sections.
BARE_NODE = """
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
"""


def test_recognition_defaults():
    """Known cards cacheable for 2 minutes; unknown ones 10 s (README: 'short TTL, 10 s')."""
    cfg = RecognitionConfig()
    assert cfg.cache_ttl_seconds == 120
    assert cfg.unknown_ttl_seconds == 10
    assert 0 < cfg.unknown_ttl_seconds < cfg.cache_ttl_seconds  # a new card is seen soon


def test_cache_defaults():
    """In-process tier alone by default, bounded; Redis calls fail fast; TTLs capped."""
    cfg = CacheConfig()
    assert cfg.redis_url is None
    assert cfg.local_max_entries == 100_000
    assert cfg.unknown_ttl_seconds == 10
    assert cfg.max_ttl_seconds == 3600
    assert cfg.redis_timeout_ms == 50


def test_the_defaults_fit_together():
    """A peer with default settings is not cut short by ours, nor are UNKNOWNs kept longer."""
    rec, cache = RecognitionConfig(), CacheConfig()
    assert cache.max_ttl_seconds >= rec.cache_ttl_seconds
    assert cache.unknown_ttl_seconds <= rec.unknown_ttl_seconds
    assert cache.local_max_entries > 0  # the in-process tier is on
    assert cache.redis_timeout_ms < 300  # well inside the default peer deadline


def test_a_node_config_without_these_sections_gets_the_same_defaults():
    """broker.node.config repeats the defaults when parsing TOML; the two must not drift."""
    cfg = parse_config(tomllib.loads(BARE_NODE), Path("/srv/yikatong"), env={})
    assert cfg.recognition == RecognitionConfig()
    assert cfg.cache == CacheConfig()


@pytest.mark.parametrize(
    ("cfg", "field"),
    [(RecognitionConfig(), "cache_ttl_seconds"), (CacheConfig(), "redis_url")],
)
def test_the_configs_are_frozen(cfg: object, field: str):
    """Settings cannot be changed after the node has started with them."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, field, 1)


def test_the_configs_compare_and_hash_by_value():
    """Frozen dataclasses: equal settings are equal and hash alike (usable as dict keys)."""
    assert RecognitionConfig(5, 1) == RecognitionConfig(cache_ttl_seconds=5, unknown_ttl_seconds=1)
    assert hash(CacheConfig(redis_url="redis://x/0")) == hash(CacheConfig(redis_url="redis://x/0"))
    assert CacheConfig(redis_url="redis://x/0") != CacheConfig()


def test_stale_limits_and_offline_policies_are_read_per_scene_and_checked():
    assert stale_by_scene({}) == STALE_BY_SCENE
    assert stale_by_scene({"max_stale_seconds": {"bus": 30}}) == {"bus": 30}
    cases: list[tuple[dict[str, object], str]] = [
        ({"max_stale_seconds": {"tram": 30}}, "not a scene"),
        ({"max_stale_seconds": {"bus": -1}}, "from 0 to 86400"),
        ({"max_stale_seconds": {"bus": True}}, "integer"),
        ({"max_stale_seconds": 30}, "a table"),
    ]
    for bad, says in cases:
        with pytest.raises(ConfigError, match=says):
            stale_by_scene(bad)
    policy = offline_by_scene({"bus": "allow_standard_fare"})
    assert policy == {**OFFLINE_BY_SCENE, "bus": "allow_standard_fare"}
    assert OfflineConfig(policy).for_scene(Scene.BUS) == "allow_standard_fare"
    assert OfflineConfig({}).for_scene(Scene.MUSEUM) == "deny"  # not listed: refused
    with pytest.raises(ConfigError, match="must be one of"):
        offline_by_scene({"bus": "allow"})
    with pytest.raises(ConfigError, match="not a scene"):
        offline_by_scene({"unspecified": "deny"})
