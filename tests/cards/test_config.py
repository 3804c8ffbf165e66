"""broker/cards/config.py: the [registry] and [privacy] sections, as the loader builds them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from broker.cards.config import PrivacyConfig, RegistryConfig
from broker.node.config import apply_env


def test_the_registry_path_is_overridden_by_yikatong_registry_path_and_nothing_else():
    cfg = RegistryConfig(Path("/var/lib/yikatong/registry.sqlite3"))
    moved = apply_env(cfg, {"YIKATONG_REGISTRY_PATH": "/srv/r.sqlite3", "YIKATONG_LISTEN": "x"})
    assert moved == RegistryConfig(Path("/srv/r.sqlite3"))
    assert apply_env(cfg, {}) is cfg


def test_the_hash_key_file_has_no_environment_override():
    """The hash key names a secret: it comes from node.toml alone."""
    cfg = PrivacyConfig(Path("/etc/yikatong/hash.key"))
    assert all("env" not in f.metadata for f in dataclasses.fields(PrivacyConfig))
    assert apply_env(cfg, {"YIKATONG_HASH_KEY_FILE": "/tmp/other"}) is cfg


def test_both_sections_are_frozen_and_required():
    cfg = RegistryConfig(Path("r"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.path = Path("other")  # type: ignore[misc]
    with pytest.raises(TypeError):
        PrivacyConfig()  # type: ignore[call-arg]
