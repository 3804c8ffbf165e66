"""What this node tells peers about caching its answers, and how it caches theirs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from broker.cards.model import Scene
from broker.core.errors import ConfigError
from broker.gate.decision import OFFLINE_POLICIES

DAY_S: Final = 86_400

# A bus ride is cheap and its risk small; a scenic area or a museum admits once a day.
STALE_BY_SCENE: Final = {"bus": 600, "scenic_area": 1800, "museum": 1800, "library": 3600}
# Refused unless a district chooses otherwise (a bus that keeps moving on the standard fare,
# say): a trip let through unverified is settled as its agreement says.
OFFLINE_BY_SCENE: Final = {
    "bus": "deny",
    "scenic_area": "deny",
    "museum": "deny",
    "library": "deny",
}
SCENE_NAMES: Final = frozenset(s.name.lower() for s in Scene if s is not Scene.UNSPECIFIED)


@dataclass(frozen=True)
class RecognitionConfig:
    """What this node tells peers about how long to cache its answers.

    Attributes:
        cache_ttl_seconds: TTL advertised with answers about known cards.
        unknown_ttl_seconds: TTL advertised with ``UNKNOWN`` answers (short, so a
            newly issued card is recognised soon).
        max_stale_seconds: how long past its TTL this home honours an answer about a
            known card (a peer that cannot reach it serves the answer ``STALE``
            meanwhile): the home settles trips by the answers it gave within TTL +
            this before travel, and pushes changes to the peer for as long.
    """

    cache_ttl_seconds: int = 120
    unknown_ttl_seconds: int = 10
    max_stale_seconds: int = 600

    @property
    def reach_seconds(self) -> int:
        """How long after it was given an answer about a known card may still be used."""
        return self.cache_ttl_seconds + self.max_stale_seconds


@dataclass(frozen=True)
class CacheConfig:
    """How this node caches its peers' answers.

    Attributes:
        redis_url: Redis shared by the district's replicas; ``None`` runs on
            the in-process tier alone (``YIKATONG_REDIS_URL`` overrides it).
        local_max_entries: bound of the in-process tier (0 disables it).
        unknown_ttl_seconds: upper bound on caching an ``UNKNOWN`` answer,
            whatever the peer advertises.
        max_ttl_seconds: upper bound on any cached answer.
        redis_timeout_ms: a Redis call slower than this counts as a miss.
        max_stale_seconds: per scene (``bus``, ``scenic_area``, ``museum``,
            ``library``), how long past its TTL an answer may be served ``STALE``
            (never longer than its home allows); a scene not listed: not at all.
    """

    redis_url: str | None = field(default=None, metadata={"env": "YIKATONG_REDIS_URL"})
    local_max_entries: int = 100_000
    unknown_ttl_seconds: int = 10
    max_ttl_seconds: int = 3600
    redis_timeout_ms: int = 50
    max_stale_seconds: Mapping[str, int] = field(
        default_factory=lambda: dict(STALE_BY_SCENE), hash=False
    )

    def stale_limit(self, scene: Scene) -> int:
        """Seconds past its TTL an answer may be served at ``scene``."""
        return self.max_stale_seconds.get(scene.name.lower(), 0)

    @property
    def longest_stale(self) -> int:
        """The longest any scene may serve an answer past its TTL (how long one is kept)."""
        return max(self.max_stale_seconds.values(), default=0)


@dataclass(frozen=True)
class OfflineConfig:
    """``[offline]``: what a gate does with a card it cannot verify (its home cannot be
    asked and nothing usable is cached), per scene: ``deny``, or ``allow_standard_fare``
    (through at the full fare, no concession; the trip is marked unverified). A scene not
    listed: ``deny``."""

    policy: Mapping[str, str] = field(default_factory=lambda: dict(OFFLINE_BY_SCENE), hash=False)

    def for_scene(self, scene: Scene) -> str:
        return self.policy.get(scene.name.lower(), "deny")


def stale_by_scene(table: Mapping[str, object]) -> dict[str, int]:
    """``[cache] max_stale_seconds`` as read from node.toml (default: :data:`STALE_BY_SCENE`)."""
    given = table.get("max_stale_seconds", STALE_BY_SCENE)
    if not isinstance(given, Mapping):
        raise ConfigError("cache.max_stale_seconds must be a table of scene = seconds")
    out = {}
    for scene, seconds in given.items():
        where = f"cache.max_stale_seconds.{scene}"
        if scene not in SCENE_NAMES:
            raise ConfigError(f"{where}: not a scene ({', '.join(sorted(SCENE_NAMES))})")
        if not isinstance(seconds, int) or isinstance(seconds, bool) or not 0 <= seconds <= DAY_S:
            raise ConfigError(f"{where} must be an integer from 0 to {DAY_S}")
        out[str(scene)] = seconds
    return out


def offline_by_scene(table: Mapping[str, object]) -> dict[str, str]:
    """``[offline]`` as read from node.toml: scene = policy, the rest :data:`OFFLINE_BY_SCENE`."""
    out = dict(OFFLINE_BY_SCENE)
    for scene, policy in table.items():
        if scene not in SCENE_NAMES:
            raise ConfigError(f"offline.{scene}: not a scene ({', '.join(sorted(SCENE_NAMES))})")
        if policy not in OFFLINE_POLICIES:
            raise ConfigError(f"offline.{scene} must be one of {', '.join(OFFLINE_POLICIES)}")
        out[str(scene)] = str(policy)
    return out
