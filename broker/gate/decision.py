"""The gate decision: may this card pass here, and with which entitlements?

A pure rule: ``allow`` is true exactly when the card is ACTIVE, entitlements
travel only with an ACTIVE card, and a reason never carries a card number.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from broker.cards.model import CardStatus, Entitlement, Recognition
from broker.fares.rules import NO_FARE, Price


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
