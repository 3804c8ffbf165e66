"""The gate decision: may this card pass here, and with which entitlements?

A pure rule: for a card whose status is known (``verified``), ``allow`` is
true exactly when it is ACTIVE; entitlements travel only with an ACTIVE
card; a reason never carries a card number. When nothing is known (its home
cannot be asked, nothing usable is cached), the scene's offline policy
decides: ``deny``, or ``allow_standard_fare`` — let through at the full fare
with no concession, unverified (the risk EMV transit calls first-ride risk).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from broker.cards.model import CardStatus, DecisionSource, Entitlement, Recognition
from broker.fares.rules import NO_FARE, Price

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
    verified: bool = True


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


DENY: Final = "deny"
ALLOW_STANDARD_FARE: Final = "allow_standard_fare"
OFFLINE_POLICIES: Final = (DENY, ALLOW_STANDARD_FARE)


def offline(reason: str, policy: str = DENY) -> Decision:
    """The offline policy of a scene, for a card that could not be verified: refused, or
    let through at the standard fare (no entitlements, so no concession). Status UNKNOWN."""
    if policy not in OFFLINE_POLICIES:
        raise ValueError(f"offline policy must be one of {', '.join(OFFLINE_POLICIES)}")
    allow = policy == ALLOW_STANDARD_FARE
    source = DecisionSource.OFFLINE_POLICY
    return Decision(allow, CardStatus.UNKNOWN, (), source, reason, NO_FARE, verified=False)
