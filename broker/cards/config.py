"""Where the card-holder registry and its hash key live: ``[registry]`` and ``[privacy]``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class RegistryConfig:
    """``[registry]``: the district's own card-holders.

    Attributes:
        path: the registry's SQLite file (``YIKATONG_REGISTRY_PATH`` overrides it).
        event_retention_hours: how long card changes are kept for peers' caches to catch
            up after an outage; a peer away longer drops its answers and starts afresh.
    """

    path: Path = field(metadata={"env": "YIKATONG_REGISTRY_PATH"})
    event_retention_hours: int = 72


@dataclass(frozen=True)
class PrivacyConfig:
    """``[privacy]``: keyed hashes of card numbers.

    Attributes:
        hash_key_file: the secret behind the keyed hashes (mode 0600), shared by
            the district's replicas (``broker hash-key init``).
    """

    hash_key_file: Path
