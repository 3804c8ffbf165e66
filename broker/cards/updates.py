"""What a home tells a peer about the cards the peer asked about (``Recognition.WatchStatus``).

Plain values, shared by the home that sends them (:mod:`broker.gate.push`), the wire
(:mod:`broker.cards.wire`) and the peer that applies them (:mod:`broker.gate.watch`).
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.cards.model import CardStatus, LogPosition


@dataclass(frozen=True, slots=True)
class Change:
    """A change of a card the peer holds ``handle`` for: a refusal (LOST, SUSPENDED,
    EXPIRED) from now on, or, ACTIVE, only "ask again"."""

    position: LogPosition
    handle: str
    status: CardStatus


@dataclass(frozen=True, slots=True)
class Progress:
    """Nothing for this peer up to ``position``."""

    position: LogPosition


@dataclass(frozen=True, slots=True)
class Rewind:
    """The peer's cursor cannot be continued: it drops this home's answers and goes on from
    ``position``."""

    position: LogPosition
    reason: str = ""


Update = Change | Progress | Rewind
