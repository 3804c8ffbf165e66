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
    the home's log position it is as of (``epoch`` "" : an answer without one); and until
    when (wall clock, ms) it is fresh — after that, until the entry expires, it may only be
    served ``STALE`` (0: fresh for as long as it is held)."""

    rec: Recognition | None
    epoch: str = ""
    seq: int = NO_SEQ
    fresh_until_ms: int = 0

    @classmethod
    def of(
        cls, rec: Recognition | None, position: LogPosition | None, fresh_until_ms: int = 0
    ) -> Entry:
        if position is None:
            return cls(rec, fresh_until_ms=fresh_until_ms)
        return cls(rec, position.epoch, position.seq, fresh_until_ms)

    def fresh(self, now_ms: int) -> bool:
        return self.fresh_until_ms == 0 or now_ms < self.fresh_until_ms


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
