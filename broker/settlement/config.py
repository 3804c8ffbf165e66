"""The part of a node's configuration that settlement reads: ledger, key, fares, agreements."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from broker.fares.agreements import Agreement
from broker.trust.config import TrustSettings


class SettlementSettings(TrustSettings, Protocol):
    """What ledgers, clearing and statements need to know about their node.

    ``broker.node.config.NodeConfig`` provides it (field by field documented
    there); settlement code takes this view so that it never imports the node.
    """

    @property
    def ledger_path(self) -> Path | None: ...
    @property
    def ledger_url(self) -> str | None: ...
    @property
    def ledger_schema(self) -> str: ...
    @property
    def settlement_key_file(self) -> Path | None: ...
    @property
    def fares_file(self) -> Path | None: ...
    @property
    def agreements(self) -> tuple[Agreement, ...]: ...

    def agreement(self, district: str) -> Agreement | None: ...
