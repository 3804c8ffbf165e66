"""Recognising this district's own cards: the answer a home district gives.

Used both when a peer district asks (``Recognition.Recognize``) and when one
of this district's own gates checks one of its own cards (source ``HOME``).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime

from broker.cards.csv_import import CardRow
from broker.cards.entitlements import entitlements_for
from broker.cards.mirror import CardCopy
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
    stale = max(min(cfg.max_stale_seconds, today_left - ttl), 0)
    status = derive_status(record.status, record.valid_until, day)
    if status is not CardStatus.ACTIVE:
        return Recognition(status, (), ttl, max_stale_seconds=stale)
    ents = entitlements_for(record.birth_date, record.disabled, record.student, day)
    return Recognition(status, ents, ttl, max_stale_seconds=stale)


class HomeRecognizer:
    """Answers for cards issued by one district from its registry.

    SQLite: the registry read runs on the event loop on purpose: it is a
    primary-key probe of a WAL-mode SQLite file (readers never wait for
    writers) and takes microseconds, while handing it to a thread costs up to
    the interpreter's switch interval under load.

    PostgreSQL: a gate's check reads the in-memory copy of the cards
    (``copy``, :mod:`broker.cards.mirror`), on the loop as well. A peer's
    answer reads the registry itself, on a thread of its own (a round trip,
    which must not hold up the gates), with the log's position in the same
    statement.
    """

    def __init__(
        self,
        district: str,
        registry: Registry,
        cfg: RecognitionConfig,
        copy: CardCopy | None = None,
    ) -> None:
        self.district = district
        self._registry = registry
        self._cfg = cfg
        self._copy = copy
        self._lookup = copy.lookup if copy is not None else registry.lookup
        self._remote = registry.where.on_postgres
        self._reader = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry-read")
            if self._remote
            else None
        )

    @property
    def copy(self) -> CardCopy | None:
        """The copy of the cards the gates read (PostgreSQL), or ``None`` (SQLite)."""
        return self._copy

    def require_own(self, ref: CardRef) -> None:
        """A card of another region is ``InvalidArgument``: this node answers for its own."""
        if ref.issuer_region != self.district:
            raise InvalidArgument(
                "card.issuer_region",
                f"this node answers only for cards issued by {self.district}",
            )

    def longest_ttl(self) -> int:
        """The longest a peer may use any answer of this home, in seconds (fresh, then
        stale)."""
        return max(self._cfg.reach_seconds, self._cfg.unknown_ttl_seconds)

    async def recognise(self, ref: CardRef, now: datetime) -> Recognition:
        """Answer for ``ref`` (a gate's); a card of another region is ``InvalidArgument``."""
        self.require_own(ref)
        return recognise(self._lookup(ref.card_number), now, self._cfg)

    async def recognise_with_position(self, ref: CardRef, now: datetime) -> Recognition:
        """Answer for ``ref`` (a peer's), with the status log's position it was read at."""
        self.require_own(ref)
        if self._reader is None:
            position, record = self._registry.lookup_with_position(ref.card_number)
        else:
            loop = asyncio.get_running_loop()
            position, record = await loop.run_in_executor(
                self._reader, self._registry.lookup_with_position, ref.card_number
            )
        return replace(recognise(record, now, self._cfg), position=position)

    def close(self) -> None:
        """Stop the reader thread, and the copy's (its own: closed with this)."""
        if self._reader is not None:
            self._reader.shutdown(wait=True)
        if self._copy is not None:
            self._copy.close()
