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

from broker.core.db import Db
from broker.core.signing import Signed, parse
from broker.settlement.clearing.store import ClearingStore, unb64
from broker.settlement.ledger.store import is_sealed


@dataclass(frozen=True)
class Position:
    counterparty: str
    receivable_fen: int
    payable_fen: int
    # provisional (no close since the late window closed) | open (a batch unacknowledged)
    # | acked (ready to confirm) | settled (figures from the signed documents both agreed)
    state: str
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
    pending = int(out[1]) if out else 0
    receivable, payable = (int(out[0]) if out else 0), (int(inbound[0]) if inbound else 0)
    agreed = settled_day(store.db, counterparty, period)
    legacy = store.db.one(  # settled by a release that kept only the figures
        "SELECT receivable_fen, payable_fen FROM positions WHERE counterparty = ? "
        "AND period = ? AND state = 'settled'",
        (counterparty, day),
    )
    if agreed is not None:
        receivable, payable = settled_figures(agreed)
        state = "settled"
    elif legacy is not None:
        receivable, payable = int(legacy[0]), int(legacy[1])
        state = "settled"
    elif not is_sealed(store.trips, period):
        state = "provisional"
    else:
        state = "open" if pending else "acked"
    return Position(
        counterparty,
        receivable,
        payable,
        state,
        int(disputes[0]) if disputes else 0,
        pending,
    )


@dataclass(frozen=True)
class SettledDay:
    """The two signed position documents both districts agreed on."""

    own: Signed
    theirs: Signed


def settled_day(db: Db, counterparty: str, period: date) -> SettledDay | None:
    """The stored agreement of ``period`` with ``counterparty``, if it is SETTLED."""
    rows = db.all(
        "SELECT side, document, key_id, signature FROM position_documents "
        "WHERE counterparty = ? AND period = ?",
        (counterparty, period.isoformat()),
    )
    docs = {str(r[0]): Signed(str(r[1]).encode(), str(r[2]), unb64(str(r[3]))) for r in rows}
    if "own" not in docs or "theirs" not in docs:
        return None
    return SettledDay(docs["own"], docs["theirs"])


def settled_figures(day: SettledDay) -> tuple[int, int]:
    """(receivable, payable) in fen as this side signed them."""
    doc = parse(day.own.document, "day-position")
    return doc.integer("receivable_fen"), doc.integer("payable_fen")


def positions(store: ClearingStore, period: date, own: str) -> list[Position]:
    """Every bilateral position of the day (counterparties with batches either way)."""
    day = period.isoformat()
    names = {
        str(r[0])
        for r in store.db.all(
            "SELECT counterparty FROM out_batches WHERE period = ? "
            "UNION SELECT sender FROM in_batches WHERE period = ? "
            "UNION SELECT counterparty FROM position_documents WHERE period = ?",
            (day, day, day),
        )
    } - {own}
    return [position(store, c, period) for c in sorted(names)]
