"""The settlement ledger: every trip operators submit, stored before it is acknowledged.

One store (:mod:`broker.settlement.ledger.store`) over embedded SQLite (the
default) or PostgreSQL (when the node config gives ``[ledger] url``). The same
test suite runs against both.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Protocol

from broker.core.errors import ConfigError
from broker.settlement.ledger.store import PostgresLedger, SqliteLedger, SqlLedger
from broker.settlement.trips import DEFAULT_DUPLICATE_WINDOW, Judgement, Trip


class Ledger(Protocol):
    def record(
        self, judged: list[tuple[Trip, Judgement]], received_at: datetime
    ) -> list[Judgement]: ...

    def outcome(self, operator_id: str, trip_id: str) -> Judgement | None: ...

    def accepted_trips(self, day: date, operator_id: str | None = None) -> list[Trip]: ...

    def count(self) -> int: ...

    def ping(self) -> bool: ...

    def close(self) -> None: ...


def open_ledger(
    path: Path | None,
    url: str | None,
    schema: str = "yikatong",
    duplicate_window: timedelta = DEFAULT_DUPLICATE_WINDOW,
) -> Ledger:
    """PostgreSQL when ``url`` is given, else SQLite at ``path``.

    ``duplicate_window``: the same tap under another trip id this close is
    refused ``suspected_duplicate`` (``[settlement] duplicate_window_s``; 0: never).
    """
    if url:
        return PostgresLedger(url, schema, duplicate_window)
    if path is None:
        raise ConfigError("[ledger] needs a path (SQLite) or a url (PostgreSQL)")
    return SqliteLedger(path, duplicate_window)


__all__ = ["Ledger", "PostgresLedger", "SqlLedger", "SqliteLedger", "open_ledger"]
