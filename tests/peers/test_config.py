"""broker/peers/config.py: [peering], how long a gate check waits for a peer."""

from __future__ import annotations

import dataclasses

import pytest

from broker.core.errors import ConfigError
from broker.node.config import apply_env
from broker.peers.config import PeeringConfig


def test_the_default_deadline_is_300_ms():
    """A home district's answer, or the offline policy, within 300 ms of a gate's 400."""
    assert PeeringConfig().deadline_ms == 300


def test_yikatong_peer_deadline_ms_overrides_the_deadline_as_an_integer():
    assert apply_env(PeeringConfig(), {"YIKATONG_PEER_DEADLINE_MS": "120"}) == PeeringConfig(120)


def test_a_deadline_override_that_is_no_integer_is_refused_naming_the_variable():
    with pytest.raises(ConfigError, match="YIKATONG_PEER_DEADLINE_MS"):
        apply_env(PeeringConfig(), {"YIKATONG_PEER_DEADLINE_MS": "300ms"})


def test_the_section_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PeeringConfig().deadline_ms = 1  # type: ignore[misc]
