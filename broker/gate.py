"""The gate decision: may this card pass here, and with which entitlements?

Plain domain code: a card of this district is answered from its registry
(``HOME``); any other card from the answers of its home district, cached or
fetched (``CACHE`` / ``PEER``); and when the home district cannot be asked,
the offline policy decides (``OFFLINE_POLICY``: refuse, status UNKNOWN).
``allow`` is true exactly when the card is ACTIVE.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Protocol

from broker.cards import CardRef, CardStatus, Entitlement, Recognition, Scene, shanghai_day
from broker.errors import PeerUnavailable
from broker.fares import NO_FARE, FareSchedule, Price
from broker.recognition import HomeRecognizer


class DecisionSource(enum.IntEnum):
    """Where a decision came from; values equal the wire enum ``yikatong.v1.DecisionSource``."""

    HOME = 1
    CACHE = 2
    PEER = 3
    STALE = 4
    OFFLINE_POLICY = 5


_REASONS = {
    CardStatus.ACTIVE: "card active",
    CardStatus.LOST: "card reported lost",
    CardStatus.SUSPENDED: "card suspended",
    CardStatus.EXPIRED: "card expired",
    CardStatus.UNKNOWN: "card not known to its home district",
}


@dataclass(frozen=True, slots=True)
class Decision:
    """A gate's answer. ``reason`` never contains a card number."""

    allow: bool
    status: CardStatus
    entitlements: tuple[Entitlement, ...]
    source: DecisionSource
    reason: str
    price: Price = NO_FARE


def decide(rec: Recognition, source: DecisionSource) -> Decision:
    """Turn a home district's answer into a gate decision."""
    active = rec.status is CardStatus.ACTIVE
    return Decision(
        allow=active,
        status=rec.status,
        entitlements=rec.entitlements if active else (),
        source=source,
        reason=_REASONS[rec.status],
    )


def offline(reason: str) -> Decision:
    """The offline policy: refuse, status UNKNOWN (a later version adds stale answers)."""
    return Decision(False, CardStatus.UNKNOWN, (), DecisionSource.OFFLINE_POLICY, reason)


class PeerAnswers(Protocol):
    """Answers about other districts' cards (``broker.peers.recognizer.PeerRecognizer``)."""

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
    ) -> None:
        self.district = district
        self._home = home
        self._peers = peers
        self._clock = clock
        self._fares = fares

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
            return offline(str(exc))
        return decide(rec, source)
