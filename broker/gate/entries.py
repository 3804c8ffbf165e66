"""What a cache tier holds for a card, and which write may replace which.

Every entry carries the home's log position of what it says (the answer's,
or a pushed change's). A write never replaces an entry of a later position
of the same epoch, so a slow ACTIVE answer that arrives after a pushed LOST
cannot bring the card back (:mod:`broker.gate.cache`).
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.cards.model import LogPosition, Recognition

NO_SEQ = -1


@dataclass(frozen=True, slots=True)
class Entry:
    """What a tier holds for a card: the answer, or ``None`` for "ask again" (a tombstone);
    and the home's log position it is as of (``epoch`` "" : an answer without one)."""

    rec: Recognition | None
    epoch: str = ""
    seq: int = NO_SEQ

    @classmethod
    def of(cls, rec: Recognition | None, position: LogPosition | None) -> Entry:
        if position is None:
            return cls(rec)
        return cls(rec, position.epoch, position.seq)


def may_replace(new: Entry, old: Entry | None) -> bool:
    """Whether ``new`` may take the place of ``old`` (see the module docstring).

    Positions of one epoch order the writes; an entry with a position is never replaced by
    one without (a home that stopped sending them cannot undo a pushed change); across
    epochs (the home's log was reset) the later write wins.
    """
    if old is None:
        return True
    if new.epoch == "":
        return old.epoch == ""
    if new.epoch != old.epoch:
        return True
    return new.seq >= old.seq
