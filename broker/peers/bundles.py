"""Keeping peers' trust bundles current: first import by hand, then fetched over mutual TLS.

Each peer configured with a ``bundle_file`` has its signed bundle kept there.
:func:`accept` is the one gate a bundle passes through — from ``broker trust
import`` or from the network: signed by a CA already trusted for that
district, with a higher sequence, or it is refused and the held one stays.
:class:`BundleRefresher` asks every peer for its bundle on an interval (and
soon after a call to that peer fails), and writes what it accepts; the node's
trust store then reloads it like any other changed file.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import grpc
import structlog

from broker._proto.yikatong.v1 import trust_pb2, trust_pb2_grpc
from broker.core.errors import ConfigError, PeerUnavailable
from broker.peers.channels import PeerChannels
from broker.trust.bundle import Bundle, BundleRefused, SignedBundle, verify
from broker.trust.config import PeerConfig, TrustConfig, TrustSettings
from broker.trust.pki import locked, write_public
from broker.trust.store import TrustStore, bundle_trust

log = structlog.get_logger(__name__)
EARLY_REFRESH_GAP_S = 5.0
FAILURES_UNHEALTHY = 3  # consecutive failed fetches before the peer's trust health fails


def held_bundle(peer: PeerConfig) -> Bundle | None:
    """The bundle held for ``peer`` now, if any."""
    if peer.bundle_file is None or not peer.bundle_file.exists():
        return None
    return Bundle.parse(SignedBundle.from_json(peer.bundle_file.read_bytes()).document)


def accept(
    peer: PeerConfig,
    signed: SignedBundle,
    first_use: bool = False,
    replace: bool = False,
    now: datetime | None = None,
    hard_age_s: int = TrustConfig.bundle_hard_age_s,
) -> Bundle | None:
    """Store ``signed`` as ``peer``'s bundle if it may replace the held one.

    Returns the new bundle, or ``None`` when it is the one already held.
    Raises :class:`BundleRefused` for a forged, foreign, stale or unusable
    bundle: everything the trust store checks when it loads the file is
    checked here first, so nothing is written that a reload would refuse.
    ``first_use`` allows a bundle with nothing held to trust itself (the
    operator has checked its CA fingerprint out of band); with ``replace`` as
    well, it replaces a held bundle whose CAs no longer sign the district's
    bundles (a neighbour that missed a CA rotation's publish stage) — its
    sequence must still be higher.
    """
    if peer.bundle_file is None:
        raise BundleRefused(f"district {peer.district} has no bundle_file configured")
    if replace and not first_use:
        raise BundleRefused("replacing a held bundle needs first use (its fingerprint checked)")
    # One writer at a time (the refresher, `broker trust import`): what is checked
    # against is what is replaced, and a lower sequence never lands over a higher one.
    with locked(peer.bundle_file.parent / ".lock"):
        return _accept(peer, peer.bundle_file, signed, first_use, replace, now, hard_age_s)


def _accept(
    peer: PeerConfig,
    bundle_file: Path,
    signed: SignedBundle,
    first_use: bool,
    replace: bool,
    now: datetime | None,
    hard_age_s: int,
) -> Bundle | None:
    held = _held_or_none(peer) if replace else held_bundle(peer)
    if held is None and not first_use:
        raise BundleRefused(f"no bundle held for {peer.district}: import the first one by hand")
    incoming = Bundle.parse(signed.document)
    if held is not None and incoming.sequence == held.sequence:
        if incoming.document() != held.document():
            raise BundleRefused(f"bundle sequence {held.sequence} reused with other content")
        return None
    anchors = None if (held is None or replace) else held.cas()
    bundle = verify(signed, peer.district, anchors, held.sequence if held else 0)
    try:
        bundle_trust(bundle, "bundle", now or datetime.now(UTC), hard_age_s)
    except ConfigError as exc:
        raise BundleRefused(f"bundle of {peer.district} is not usable: {exc}") from None
    write_public(bundle_file, signed.to_json())
    return bundle


def _held_or_none(peer: PeerConfig) -> Bundle | None:
    """The held bundle, or ``None`` when there is none or it cannot be read."""
    try:
        return held_bundle(peer)
    except (BundleRefused, OSError):
        return None


class BundleRefresher:
    """Fetches every bundle-configured peer's bundle over its mutual-TLS channel."""

    def __init__(
        self,
        cfg: TrustSettings,
        channels: PeerChannels,
        store: TrustStore,
        on_change: Callable[[], None],
    ) -> None:
        self._peers = [p for p in cfg.peers if p.bundle_file is not None]
        self._interval = cfg.trust.bundle_refresh_s
        self._hard_age_s = cfg.trust.bundle_hard_age_s
        self.failures: dict[str, int] = {}  # consecutive failed fetches per peer
        self._channels = channels
        self._store = store
        self._on_change = on_change
        self._wake = asyncio.Event()
        self._last_early = 0.0

    def poke(self) -> None:
        """Refresh soon (a call to a peer failed: it may have rotated); at most every 5 s."""
        now = time.monotonic()
        if now - self._last_early >= EARLY_REFRESH_GAP_S:
            self._last_early = now
            self._wake.set()

    def fetching(self, district: str) -> bool:
        """False once ``district``'s bundle could not be fetched or used several times running."""
        return self.failures.get(district, 0) < FAILURES_UNHEALTHY

    async def refresh(self, peer: PeerConfig) -> bool:
        """Fetch and accept one peer's bundle; True when a newer one was stored."""
        d = peer.district
        try:
            stub = trust_pb2_grpc.TrustStub(self._channels.channel(d))
            resp = await stub.GetBundle(trust_pb2.GetBundleRequest(), timeout=5)
        except PeerUnavailable as exc:  # not trusted: only a bundle imported by hand helps
            self.failures[d] = self.failures.get(d, 0) + 1
            log.warning("bundle_fetch_impossible", district=d, reason=str(exc))
            return False
        except grpc.aio.AioRpcError as exc:
            self.failures[d] = self.failures.get(d, 0) + 1
            log.warning("bundle_fetch_failed", district=d, code=exc.code().name)
            return False
        signed = SignedBundle(resp.document, resp.signer, resp.signature)
        try:
            bundle = await asyncio.to_thread(accept, peer, signed, hard_age_s=self._hard_age_s)
        except BundleRefused as exc:
            self.failures[d] = self.failures.get(d, 0) + 1
            log.error("bundle_refused", district=d, reason=str(exc))
            return False
        except OSError as exc:  # our own file or lock: this peer fails, the others go on
            self.failures[d] = self.failures.get(d, 0) + 1
            log.error("bundle_not_stored", district=d, reason=str(exc))
            return False
        self.failures[d] = 0
        if bundle is None:
            return False
        log.info("bundle_accepted", district=peer.district, sequence=bundle.sequence)
        self._on_change()
        return True

    async def run(self) -> None:
        while True:
            # Cleared before the round, not after: a poke while the round runs (a call to
            # a peer failed meanwhile) starts the next round at once instead of being lost.
            self._wake.clear()
            for peer in self._peers:
                await self.refresh(peer)
            with contextlib.suppress(TimeoutError):  # asyncio.timeout: see Node._watch_trust
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
