"""Where the card-holder registry and its hash key live: ``[registry]`` and ``[privacy]``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from broker.core.errors import ConfigError


@dataclass(frozen=True)
class RegistryConfig:
    """``[registry]``: the district's own card-holders.

    Attributes:
        path: the registry's SQLite file (``YIKATONG_REGISTRY_PATH`` overrides it);
            peers' handles are kept in a file beside it.
        event_retention_hours: how long card changes are kept for peers' caches to catch
            up after an outage; a peer away longer drops its answers and starts afresh.
        url: a PostgreSQL URL instead of SQLite (``YIKATONG_REGISTRY_URL`` overrides it):
            one registry, one status log and one set of handles for replicas on several
            hosts.
        schema: the PostgreSQL schema of the registry (and of the handles).
    """

    path: Path | None = field(default=None, metadata={"env": "YIKATONG_REGISTRY_PATH"})
    event_retention_hours: int = 72
    url: str | None = field(default=None, metadata={"env": "YIKATONG_REGISTRY_URL"})
    schema: str = "registry"

    def __post_init__(self) -> None:
        if self.path is None and not self.url:
            raise ConfigError("[registry] needs a path (SQLite) or a url (PostgreSQL)")

    @property
    def on_postgres(self) -> bool:
        return bool(self.url)


@dataclass(frozen=True)
class PrivacyConfig:
    """``[privacy]``: keyed hashes of card numbers.

    Attributes:
        hash_key_file: the secret behind the keyed hashes (mode 0600), shared by
            the district's replicas (``broker hash-key init``).
    """

    hash_key_file: Path
