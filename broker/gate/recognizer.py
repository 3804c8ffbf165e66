"""Recognising other districts' cards: cache first, then one peer call per card.

Concurrent checks of the same uncached card share a single peer call
(single-flight). Answers are cached for the TTL the home district gives;
errors are never cached. Past its TTL, an answer is served ``STALE`` for as
long as both its home (``max_stale_seconds``) and this district's limit for
the scene allow, while one background call asks the home again
(stale-while-revalidate).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from broker.cards.model import CardRef, DecisionSource, Recognition, Scene
from broker.cards.privacy import Hasher
from broker.core.errors import PeerUnavailable
from broker.gate.cache import AnswerCache
from broker.gate.singleflight import SingleFlight
from broker.peers.client import PeerClient

log = structlog.get_logger(__name__)


class PeerRecognizer:
    """Answers about cards of configured peer districts."""

    def __init__(
        self,
        client: PeerClient,
        cache: AnswerCache,
        hasher: Hasher,
        on_failure: Callable[[], None] = lambda: None,
    ) -> None:
        self._client = client
        self._cache = cache
        self._hasher = hasher
        self._on_failure = on_failure
        self._flights: SingleFlight[str, Recognition] = SingleFlight()
        self.peer_calls = 0
        self.refresh_failures = 0  # background refreshes of stale answers that failed
        self._refreshing: set[asyncio.Task[tuple[Recognition, bool]]] = set()
        # A test hook: awaited between a peer's answer and its caching (an answer held in
        # flight while the home pushes a change); None in service.
        self.before_caching: Callable[[CardRef], Awaitable[None]] | None = None

    def key(self, ref: CardRef) -> str:
        """The card's cache key: its issuer and our handle for it (a keyed hash of its own
        domain, which its home names it by in the changes it pushes; the logs use
        :meth:`Hasher.card_key`, which the home never sees)."""
        return f"{ref.issuer_region}:{self._hasher.card_handle(ref)}"

    def cached(self, ref: CardRef) -> Recognition | None:
        """The in-process tier only: answered without leaving the event loop's turn."""
        return self._cache.get_local(self.key(ref))

    async def recognise(
        self, ref: CardRef, scene: Scene, request_id: str
    ) -> tuple[Recognition, DecisionSource]:
        """The home district's answer, from Redis or a (shared) peer call."""
        if not self._client.configured(ref.issuer_region):
            raise PeerUnavailable(ref.issuer_region, "no peer agreement with this district")
        key = self.key(ref)
        found = await self._cache.lookup(key, self._cache.stale_limit(scene))
        if found is not None:
            rec, stale = found
            if not stale:
                return rec, DecisionSource.CACHE
            self._refresh(ref, scene, request_id, key)  # meanwhile, the stale answer
            return rec, DecisionSource.STALE
        rec, _shared = await self._flights.do(key, lambda: self._fetch(ref, scene, request_id, key))
        return rec, DecisionSource.PEER

    async def _fetch(self, ref: CardRef, scene: Scene, request_id: str, key: str) -> Recognition:
        self.peer_calls += 1
        try:
            rec = await self._client.recognize(ref, scene, request_id, handle=handle_of(key))
        except PeerUnavailable:
            self._on_failure()  # the peer may have rotated: look at its bundle soon
            raise
        if self.before_caching is not None:
            await self.before_caching(ref)
        await self._cache.put(key, rec)
        log.debug(
            "peer_answer",
            district=ref.issuer_region,
            card=self._hasher.card_key(ref),
            status=rec.status.name,
        )
        return rec

    def _refresh(self, ref: CardRef, scene: Scene, request_id: str, key: str) -> None:
        """Ask the home again in the background (one call per card at a time, shared with
        any check that asks meanwhile); a failure leaves the stale answer as it is."""
        if self._flights.busy(key):
            return
        task = asyncio.ensure_future(
            self._flights.do(key, lambda: self._fetch(ref, scene, request_id, key))
        )
        self._refreshing.add(task)
        task.add_done_callback(self._refreshed)

    def _refreshed(self, task: asyncio.Task[tuple[Recognition, bool]]) -> None:
        self._refreshing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.refresh_failures += 1


def handle_of(key: str) -> str:
    """Our handle for a card at its home: the keyed hash part of its cache key."""
    return key.rsplit(":", 1)[1]
