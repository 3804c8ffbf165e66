"""What this node tells peers about caching its answers, and how it caches theirs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RecognitionConfig:
    """What this node tells peers about how long to cache its answers.

    Attributes:
        cache_ttl_seconds: TTL advertised with answers about known cards.
        unknown_ttl_seconds: TTL advertised with ``UNKNOWN`` answers (short, so a
            newly issued card is recognised soon).
    """

    cache_ttl_seconds: int = 120
    unknown_ttl_seconds: int = 10


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
    """

    redis_url: str | None = field(default=None, metadata={"env": "YIKATONG_REDIS_URL"})
    local_max_entries: int = 100_000
    unknown_ttl_seconds: int = 10
    max_ttl_seconds: int = 3600
    redis_timeout_ms: int = 50
