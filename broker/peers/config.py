"""How this node calls its peers: ``[peering]`` (the peers themselves are ``trust.config``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PeeringConfig:
    """``[peering]``.

    Attributes:
        deadline_ms: how long a gate check waits for a peer's answer before the
            offline policy decides (``YIKATONG_PEER_DEADLINE_MS`` overrides it).
    """

    deadline_ms: int = field(default=300, metadata={"env": "YIKATONG_PEER_DEADLINE_MS"})
