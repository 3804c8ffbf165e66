"""The gate service: decides a check at this district's gates, and prices it.

Plain domain code: a card of this district is answered from its registry
(``HOME``); any other card from the answers of its home district, cached or
fetched (``CACHE`` / ``PEER``); and when the home district cannot be asked,
the offline policy decides (``OFFLINE_POLICY``: refuse, status UNKNOWN).
The decision itself is :mod:`broker.gate.decision`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Protocol

from broker.cards.model import CardRef, DecisionSource, Recognition, Scene, shanghai_day
from broker.core.errors import PeerUnavailable
from broker.fares.rules import FareSchedule
from broker.gate.config import OfflineConfig
from broker.gate.decision import Decision, decide, offline
from broker.gate.home import HomeRecognizer


class PeerAnswers(Protocol):
    """Answers about other districts' cards (``broker.gate.recognizer.PeerRecognizer``)."""

    def cached(self, ref: CardRef) -> Recognition | None: ...

    async def recognise(
        self, ref: CardRef, scene: Scene, request_id: str
    ) -> tuple[Recognition, DecisionSource]: ...


class GateService:
    """Decides gate checks for one district."""

    def __init__(
        self,
        district: str,
        home: HomeRecognizer,
        peers: PeerAnswers,
        clock: Callable[[], datetime],
        fares: FareSchedule | None = None,
        offline_policy: OfflineConfig | None = None,
    ) -> None:
        """``offline_policy``: per scene, what to do with a card that cannot be verified
        (default: refuse)."""
        self.district = district
        self._home = home
        self._peers = peers
        self._clock = clock
        self._fares = fares
        self._offline = offline_policy or OfflineConfig({})

    async def check(
        self, ref: CardRef, scene: Scene, request_id: str, operator: str = "", place: str = ""
    ) -> Decision:
        """Decide whether ``ref`` may pass at ``scene``, and price it by this district's rules.

        Same-city treatment: the fare rules are this district's (the place of
        travel); the entitlements are what the card's home district recognised.
        """
        decision = await self._recognise(ref, scene, request_id)
        if not decision.allow or self._fares is None:
            return decision
        table = self._fares.table_on(shanghai_day(self._clock()))
        if table is None:
            return decision
        return replace(decision, price=table.price(operator, scene, place, decision.entitlements))

    async def _recognise(self, ref: CardRef, scene: Scene, request_id: str) -> Decision:
        if ref.issuer_region == self.district:
            return decide(await self._home.recognise(ref, self._clock()), DecisionSource.HOME)
        hit = self._peers.cached(ref)
        if hit is not None:
            return decide(hit, DecisionSource.CACHE)
        try:
            rec, source = await self._peers.recognise(ref, scene, request_id)
        except PeerUnavailable as exc:
            return offline(str(exc), self._offline.for_scene(scene))
        return decide(rec, source)
