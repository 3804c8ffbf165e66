"""Day confirmation, both sides: when a day may be confirmed, and what a SETTLED day keeps.

A day may be confirmed with a counterparty only when its late window has
closed, a close has run after that (the day is sealed in the ledger, so no
trip of it can be accepted any more), no batch to the counterparty waits for
its acknowledgement and no dispute with it is open. Both sides apply these
checks to their own stores. When the two signed position documents agree,
each side stores *both* in one transaction; from then on the day's figures
are read from those documents and nothing changes them (a batch for the
day is refused, a late trip is ``too_late``).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime
from typing import Any

from broker.core.db import Db, utc_text
from broker.core.errors import SettlementStateError
from broker.settlement.clearing.positions import Position, SettledDay, position, settled_day
from broker.settlement.clearing.store import ClearingStore, b64
from broker.settlement.days import require_window_closed
from broker.settlement.ledger.store import is_sealed


def require_ready(store: ClearingStore, counterparty: str, period: date, now: datetime) -> Position:
    """This side's position with ``counterparty``, if the day may be confirmed; else why not."""
    require_window_closed(period, now)
    if not is_sealed(store.trips, period):
        raise SettlementStateError(
            f"cannot confirm {period.isoformat()}: no close has run since its late window "
            "closed; run `broker settle close` for the day first"
        )
    unbatched = unbatched_trips(store, counterparty, period)
    if unbatched:
        raise SettlementStateError(
            f"cannot confirm {period.isoformat()} with {counterparty}: {unbatched} accepted "
            "trip(s) of the day are in no batch yet; run `broker settle close` for the day"
        )
    mine = position(store, counterparty, period)
    if mine.pending_batches or mine.open_disputes:
        raise SettlementStateError(
            f"cannot confirm {period.isoformat()} with {counterparty}: "
            f"{mine.pending_batches} batch(es) unacknowledged, "
            f"{mine.open_disputes} dispute(s) not resolved"
        )
    return mine


def position_doc(own: str, counterparty: str, period: date, mine: Position) -> dict[str, Any]:
    """This side's view of the day, to be signed."""
    return {
        "type": "position",
        "from": own,
        "to": counterparty,
        "period": period.isoformat(),
        "receivable_fen": mine.receivable_fen,
        "payable_fen": mine.payable_fen,
    }


def addressed(doc: Mapping[str, Any], frm: str, to: str, period: date) -> bool:
    """Whether a position document is ``frm``'s, to ``to``, about ``period``."""
    return (
        doc.get("type") == "position"
        and doc.get("from") == frm
        and doc.get("to") == to
        and doc.get("period") == period.isoformat()
    )


def mirrors(doc: Mapping[str, Any], mine: Position) -> bool:
    """Whether the counterparty's figures are ours seen from its side."""
    return (
        doc.get("receivable_fen") == mine.payable_fen
        and doc.get("payable_fen") == mine.receivable_fen
    )


def store_settled(
    db: Db, counterparty: str, period: date, mine: Position, agreed: SettledDay, now: datetime
) -> None:
    """Record the day SETTLED with both signed documents, in one transaction."""
    day = period.isoformat()
    with db.write():
        for side, signed in (("own", agreed.own), ("theirs", agreed.theirs)):
            db.execute(
                "INSERT INTO position_documents (counterparty, period, side, document, key_id, "
                "signature, stored_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (counterparty, period, side) DO NOTHING",
                (
                    counterparty,
                    day,
                    side,
                    signed.document.decode(),
                    signed.key_id,
                    b64(signed.signature),
                    utc_text(now),
                ),
            )
        db.execute(
            "INSERT INTO positions (counterparty, period, receivable_fen, payable_fen, state, "
            "confirmed_at) VALUES (?, ?, ?, ?, 'settled', ?) "
            "ON CONFLICT (counterparty, period) DO NOTHING",
            (counterparty, day, mine.receivable_fen, mine.payable_fen, utc_text(now)),
        )


def refuse_if_settled(db: Db, counterparty: str, period: date) -> None:
    """A batch for a SETTLED day is refused: nothing changes a settled day."""
    if settled_day(db, counterparty, period) is not None or db.one(
        "SELECT 1 FROM positions WHERE counterparty = ? AND period = ? AND state = 'settled'",
        (counterparty, period.isoformat()),
    ):
        raise SettlementStateError(
            f"{period.isoformat()} is SETTLED between {counterparty} and this district: "
            "no batch for it is taken"
        )


def unbatched_trips(store: ClearingStore, counterparty: str, period: date) -> int:
    """Accepted trips of ``period`` by ``counterparty``'s card-holders after the last close."""
    top = store.db.one(
        "SELECT coalesce(max(watermark), 0) FROM day_closes WHERE period = ?",
        (period.isoformat(),),
    )
    row = store.trips.one(
        "SELECT count(*) FROM trips WHERE settlement_day = ? AND outcome = 'accepted' "
        "AND issuer_region = ? AND ingest_seq > ?",
        (store.trips.day(period), counterparty, int(top[0]) if top else 0),
    )
    return int(row[0]) if row else 0
