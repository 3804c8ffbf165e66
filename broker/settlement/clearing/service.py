"""Clearing inside a running node: the home side of exchanges, off the event loop.

Received batches are verified in a process of its own (:mod:`broker.settlement.clearing.
worker`: long Python work that would otherwise hold the interpreter lock against the
gates); every other step runs on one worker thread (trip intake keeps its own writer).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timedelta
from typing import TypeVar

from broker.cards.registry import Registry
from broker.core.db import Db
from broker.core.signing import Signed, Signer
from broker.fares.rules import FareSchedule
from broker.settlement.clearing.batch import Spool
from broker.settlement.clearing.receiver import Ack, Receiver
from broker.settlement.clearing.reports import operator_statement
from broker.settlement.clearing.store import ClearingStore
from broker.settlement.clearing.tail import Hint
from broker.settlement.clearing.worker import Streamed, Verifier
from broker.settlement.config import SettlementSettings
from broker.settlement.statements import StatementLine
from broker.trust.store import TrustStore, bundle_keys

T = TypeVar("T")


class ClearingService:
    def __init__(
        self,
        cfg: SettlementSettings,
        registry: Registry,
        trust: TrustStore,
        fares: FareSchedule | None,
        clock: Callable[[], datetime],
    ) -> None:
        assert cfg.settlement.key_file is not None
        self._cfg = cfg
        self._fares = fares
        self.store = ClearingStore.open(cfg)
        self.receiver = Receiver(
            cfg.district,
            self.store,
            Signer.from_file(cfg.settlement.key_file),
            registry,
            bundle_keys(lambda: trust.current),
            cfg.agreement,
            fares,
            clock,
            timedelta(seconds=cfg.fares.changeover_grace_s),
        )
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clearing")
        # Batches are verified in a process of their own (broker.settlement.clearing.worker).
        self._verifier = Verifier(cfg, registry.where, bundle_keys(lambda: trust.current), clock)
        self._chunks_db: Db | None = None

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def publish_fares(self, sender: str, signed: Signed) -> list[str]:
        return await self._run(self.receiver.publish_fares, sender, signed)

    def stream(self, sender: str, spool: Spool, hint: Hint) -> Streamed:
        """Start verifying ``sender``'s batch while ``spool`` fills (the sender's ``hint``
        says which batch it is); :meth:`receive` then finishes it."""
        return self._verifier.stream(sender, spool, hint)

    async def receive(
        self, sender: str, spool: Spool, trailer: Signed, streamed: Streamed | None = None
    ) -> Ack:
        """The acknowledgement of a whole spooled batch: from its verification as it arrived
        (``streamed``) if that took, else from verifying the spool now."""
        if streamed is not None:
            streamed.end(sender, trailer)
            ack = await streamed.work
            if ack is not None:
                return ack.bound(self._reader())
        ack = await self._verifier.receive(sender, spool, trailer)
        return ack.bound(self._reader())

    def _reader(self) -> Db:
        """A connection of its own for reading stored acknowledgements' chunks as they are
        sent (on the event loop: it never waits behind this service's worker thread)."""
        if self._chunks_db is None:
            self._chunks_db = self.store.reader(self._cfg)
        return self._chunks_db

    async def confirm(self, sender: str, signed: Signed) -> Signed:
        return await self._run(self.receiver.confirm, sender, signed)

    async def statement(self, period: date, operator_id: str | None) -> list[StatementLine]:
        return await self._run(
            operator_statement,
            self._cfg,
            self._fares,
            self.store,
            period,
            operator_id,
        )

    def close(self) -> None:
        self._verifier.close()
        self._worker.shutdown(wait=True)
        self.store.close()
        if self._chunks_db is not None:
            self._chunks_db.close()
