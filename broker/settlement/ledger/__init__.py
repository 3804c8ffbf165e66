"""The settlement ledger: every trip operators submit, stored before it is acknowledged.

One store (:mod:`broker.settlement.ledger.store`) over embedded SQLite (the
default) or PostgreSQL (when the node config gives ``[ledger] url``). The same
test suite runs against both.
"""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path
from typing import Protocol

from broker.core.errors import ConfigError
from broker.settlement.ledger.store import PostgresLedger, SqliteLedger, SqlLedger
from broker.settlement.trips import Judgement, Trip


class Ledger(Protocol):
    def record(
        self, judged: list[tuple[Trip, Judgement]], received_at: datetime
    ) -> list[Judgement]: ...

    def outcome(self, operator_id: str, trip_id: str) -> Judgement | None: ...

    def accepted_trips(self, day: date, operator_id: str | None = None) -> list[Trip]: ...

    def count(self) -> int: ...

    def ping(self) -> bool: ...

    def close(self) -> None: ...


def open_ledger(path: Path | None, url: str | None, schema: str = "yikatong") -> Ledger:
    """PostgreSQL when ``url`` is given, else SQLite at ``path``."""
    if url:
        return PostgresLedger(url, schema)
    if path is None:
        raise ConfigError("[ledger] needs a path (SQLite) or a url (PostgreSQL)")
    return SqliteLedger(path)


__all__ = ["Ledger", "PostgresLedger", "SqlLedger", "SqliteLedger", "open_ledger"]
