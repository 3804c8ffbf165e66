"""A :class:`Sender` with everything it needs opened from a node config, and closed after."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from broker.core.errors import ConfigError
from broker.core.signing import Signer
from broker.fares.rules import load_fares
from broker.peers.channels import PeerChannels
from broker.settlement.clearing.sender import Sender
from broker.settlement.clearing.store import ClearingStore
from broker.settlement.config import SettlementSettings
from broker.trust.store import TrustStore, bundle_keys


@asynccontextmanager
async def open_sender(
    cfg: SettlementSettings,
    progress: Callable[[str, int], None] = lambda what, n: None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> AsyncIterator[Sender]:
    """Trust material, peer channels, the clearing store and the settlement key of ``cfg``.

    ``clock`` is the sender's time: it decides whether a day has ended and its
    late window closed (the demo and the end-to-end tests run a day on their own).
    """
    if cfg.settlement.key_file is None:
        raise ConfigError("[settlement] key_file is not set: this node cannot sign batches")
    trust = TrustStore(cfg)
    channels = PeerChannels(trust, cfg.peers)
    store = ClearingStore.open(cfg)
    try:
        yield Sender(
            cfg,
            store,
            Signer.from_file(cfg.settlement.key_file),
            load_fares(cfg.fares.file) if cfg.fares.file else None,
            channels.channel,
            bundle_keys(lambda: trust.current),
            clock,
            progress,
        )
    finally:
        await channels.close()
        store.close()
