"""Net positions: what each pair of districts owes the other for a day, and the netting.

This district's *receivable* from a counterparty for a day is the sum of
the claims the counterparty accepted in its acknowledgements of our batches;
its *payable* is the sum of the claims we accepted in our acknowledgements
of theirs. The bilateral net is receivable − payable; the multilateral net
of a district is the sum of its bilateral nets. Both districts compute each
pair from the same signed acknowledgements, so across all districts the nets
sum to zero — the tests check it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from broker.settlement.clearing.store import ClearingStore


@dataclass(frozen=True)
class Position:
    counterparty: str
    receivable_fen: int
    payable_fen: int
    state: str  # open | acked | settled
    open_disputes: int = 0
    pending_batches: int = 0

    @property
    def net_fen(self) -> int:
        return self.receivable_fen - self.payable_fen


def position(store: ClearingStore, counterparty: str, period: date) -> Position:
    """This district's bilateral position with ``counterparty`` for ``period``."""
    day = period.isoformat()
    out = store.db.one(
        "SELECT coalesce(sum(accepted_claim_fen), 0), "
        "coalesce(sum(CASE WHEN state = 'built' THEN 1 ELSE 0 END), 0) "
        "FROM out_batches WHERE counterparty = ? AND period = ?",
        (counterparty, day),
    )
    inbound = store.db.one(
        "SELECT coalesce(sum(accepted_claim_fen), 0) FROM in_batches "
        "WHERE sender = ? AND period = ?",
        (counterparty, day),
    )
    disputes = store.db.one(
        "SELECT count(*) FROM disputes WHERE counterparty = ? AND period = ? "
        "AND state IN ('open', 'represented', 'final')",
        (counterparty, day),
    )
    settled = store.db.one(
        "SELECT state FROM positions WHERE counterparty = ? AND period = ?", (counterparty, day)
    )
    pending = int(out[1]) if out else 0
    state = "settled" if settled else ("open" if pending else "acked")
    return Position(
        counterparty,
        int(out[0]) if out else 0,
        int(inbound[0]) if inbound else 0,
        state,
        int(disputes[0]) if disputes else 0,
        pending,
    )


def positions(store: ClearingStore, period: date, own: str) -> list[Position]:
    """Every bilateral position of the day (counterparties with batches either way)."""
    day = period.isoformat()
    names = {
        str(r[0])
        for r in store.db.all(
            "SELECT counterparty FROM out_batches WHERE period = ? "
            "UNION SELECT sender FROM in_batches WHERE period = ?",
            (day, day),
        )
    } - {own}
    return [position(store, c, period) for c in sorted(names)]
