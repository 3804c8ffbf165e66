"""Recognising this district's own cards: the answer a home district gives.

Used both when a peer district asks (``Recognition.Recognize``) and when one
of this district's own gates checks one of its own cards (source ``HOME``).
"""

from __future__ import annotations

from datetime import datetime

from broker.cards.csv_import import CardRow
from broker.cards.entitlements import entitlements_for
from broker.cards.model import (
    CardRef,
    CardStatus,
    Recognition,
    seconds_to_shanghai_midnight,
    shanghai_day,
)
from broker.cards.registry import Registry, derive_status
from broker.core.errors import InvalidArgument
from broker.gate.config import RecognitionConfig


def recognise(record: CardRow | None, now: datetime, cfg: RecognitionConfig) -> Recognition:
    """The home district's answer about a card at instant ``now``.

    Entitlements are derived at request time from the birth date and flags,
    and returned only for an ACTIVE card: a gate has no use for the
    entitlements of a card it refuses.
    """
    # No answer outlives the day it was given for: validity and age thresholds turn over at
    # midnight in Asia/Shanghai.
    today_left = seconds_to_shanghai_midnight(now)
    if record is None:
        return Recognition(CardStatus.UNKNOWN, (), min(cfg.unknown_ttl_seconds, today_left))
    day = shanghai_day(now)
    ttl = min(cfg.cache_ttl_seconds, today_left)
    status = derive_status(record.status, record.valid_until, day)
    if status is not CardStatus.ACTIVE:
        return Recognition(status, (), ttl)
    ents = entitlements_for(record.birth_date, record.disabled, record.student, day)
    return Recognition(status, ents, ttl)


class HomeRecognizer:
    """Answers for cards issued by one district from its registry.

    The registry read runs on the event loop on purpose: it is a primary-key
    probe of a WAL-mode SQLite file (readers never wait for writers) and
    takes microseconds, while handing it to a thread costs up to the
    interpreter's switch interval (5 ms) under load.
    """

    def __init__(self, district: str, registry: Registry, cfg: RecognitionConfig) -> None:
        self.district = district
        self._registry = registry
        self._cfg = cfg

    def require_own(self, ref: CardRef) -> None:
        """A card of another region is ``InvalidArgument``: this node answers for its own."""
        if ref.issuer_region != self.district:
            raise InvalidArgument(
                "card.issuer_region",
                f"this node answers only for cards issued by {self.district}",
            )

    def longest_ttl(self) -> int:
        """The longest a peer may cache any answer of this home, in seconds."""
        return max(self._cfg.cache_ttl_seconds, self._cfg.unknown_ttl_seconds)

    async def recognise(self, ref: CardRef, now: datetime) -> Recognition:
        """Answer for ``ref``; a card of another region is ``InvalidArgument``."""
        self.require_own(ref)
        return recognise(self._registry.lookup(ref.card_number), now, self._cfg)
