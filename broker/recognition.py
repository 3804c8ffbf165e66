"""Recognising this district's own cards: the answer a home district gives.

Used both when a peer district asks (``Recognition.Recognize``) and when one
of this district's own gates checks one of its own cards (source ``HOME``).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from datetime import datetime

from broker.cards import CardRef, CardStatus, Recognition, entitlements_for, shanghai_day
from broker.config import RecognitionConfig
from broker.errors import InvalidArgument
from broker.registry import CardRecord, Registry, derive_status


def recognise(record: CardRecord | None, now: datetime, cfg: RecognitionConfig) -> Recognition:
    """The home district's answer about a card at instant ``now``.

    Entitlements are derived at request time from the birth date and flags,
    and returned only for an ACTIVE card: a gate has no use for the
    entitlements of a card it refuses.
    """
    if record is None:
        return Recognition(CardStatus.UNKNOWN, (), cfg.unknown_ttl_seconds)
    day = shanghai_day(now)
    status = derive_status(record.status, record.valid_until, day)
    if status is not CardStatus.ACTIVE:
        return Recognition(status, (), cfg.cache_ttl_seconds)
    ents = entitlements_for(record.birth_date, record.disabled, record.student, day)
    return Recognition(status, ents, cfg.cache_ttl_seconds)


class HomeRecognizer:
    """Answers for cards issued by one district, reading its registry off the event loop."""

    def __init__(
        self, district: str, registry: Registry, cfg: RecognitionConfig, executor: Executor
    ) -> None:
        self.district = district
        self._registry = registry
        self._cfg = cfg
        self._executor = executor

    async def recognise(self, ref: CardRef, now: datetime) -> Recognition:
        """Answer for ``ref``; a card of another region is ``InvalidArgument``."""
        if ref.issuer_region != self.district:
            raise InvalidArgument(
                "card.issuer_region",
                f"this node answers only for cards issued by {self.district}",
            )
        loop = asyncio.get_running_loop()
        record = await loop.run_in_executor(self._executor, self._registry.lookup, ref.card_number)
        return recognise(record, now, self._cfg)
