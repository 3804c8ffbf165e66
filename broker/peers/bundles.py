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

import grpc
import structlog

from broker._proto.yikatong.v1 import trust_pb2, trust_pb2_grpc
from broker.peers.channels import PeerChannels
from broker.trust.bundle import Bundle, BundleRefused, SignedBundle, verify
from broker.trust.config import PeerConfig, TrustSettings
from broker.trust.pki import write_public
from broker.trust.store import TrustStore

log = structlog.get_logger(__name__)
EARLY_REFRESH_GAP_S = 5.0


def held_bundle(peer: PeerConfig) -> Bundle | None:
    """The bundle held for ``peer`` now, if any."""
    if peer.bundle_file is None or not peer.bundle_file.exists():
        return None
    return Bundle.parse(SignedBundle.from_json(peer.bundle_file.read_bytes()).document)


def accept(peer: PeerConfig, signed: SignedBundle, first_use: bool = False) -> Bundle | None:
    """Store ``signed`` as ``peer``'s bundle if it may replace the held one.

    Returns the new bundle, or ``None`` when it is the one already held.
    Raises :class:`BundleRefused` for a forged, foreign or stale bundle.
    ``first_use`` allows a bundle with nothing held to trust itself (the
    operator has checked its CA fingerprint out of band).
    """
    if peer.bundle_file is None:
        raise BundleRefused(f"district {peer.district} has no bundle_file configured")
    held = held_bundle(peer)
    if held is None and not first_use:
        raise BundleRefused(f"no bundle held for {peer.district}: import the first one by hand")
    incoming = Bundle.parse(signed.document)
    if held is not None and incoming.sequence == held.sequence:
        if incoming.document() != held.document():
            raise BundleRefused(f"bundle sequence {held.sequence} reused with other content")
        return None
    bundle = verify(
        signed, peer.district, held.cas() if held else None, held.sequence if held else 0
    )
    write_public(peer.bundle_file, signed.to_json())
    return bundle


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

    async def refresh(self, peer: PeerConfig) -> bool:
        """Fetch and accept one peer's bundle; True when a newer one was stored."""
        stub = trust_pb2_grpc.TrustStub(self._channels.channel(peer.district))
        try:
            resp = await stub.GetBundle(trust_pb2.GetBundleRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            log.warning("bundle_fetch_failed", district=peer.district, code=exc.code().name)
            return False
        signed = SignedBundle(resp.document, resp.signer, resp.signature)
        try:
            bundle = await asyncio.to_thread(accept, peer, signed)
        except BundleRefused as exc:
            log.error("bundle_refused", district=peer.district, reason=str(exc))
            return False
        if bundle is None:
            return False
        log.info("bundle_accepted", district=peer.district, sequence=bundle.sequence)
        self._on_change()
        return True

    async def run(self) -> None:
        while True:
            for peer in self._peers:
                await self.refresh(peer)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._interval)
