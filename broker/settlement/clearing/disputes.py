"""Disputes on the serving side: a rejected line represented once, or resolved by hand.

A close's rejected lines open disputes when their acknowledgement is stored
(:mod:`broker.settlement.clearing.acks`). Each may be represented once: a
batch of one corrected line, built here and sent like any batch; the home
district's verdict on it is final. Or the district resolves it by hand, with
a note saying what was agreed.

A representment is the same trip: it may correct only what a rejection can be
about, the entitlement applied and the price (:data:`CORRECTABLE`), never the
card, place, time or gate (the home district refuses those ``NOT_SAME_TRIP``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import date
from typing import Any

from broker.core.db import Db
from broker.core.errors import SettlementStateError
from broker.settlement.clearing.batch import Line, encode_lines
from broker.settlement.clearing.store import ClearingStore, b64, next_seq
from broker.settlement.ledger.common import TRIP_COLUMNS, trip_from_row
from broker.settlement.trips import CORRECTABLE, CORRECTABLE_BY_CODE, Trip


def build_represent(
    store: ClearingStore,
    line_for: Callable[[Trip], Line],
    now: str,
    counterparty: str,
    operator_id: str,
    trip_id: str,
    corrections: Mapping[str, Any],
) -> tuple[int, date]:
    """Fix the representment of an open dispute as a ``built`` batch; its (sequence, day).

    ``corrections`` name fields of :class:`Trip` in :data:`CORRECTABLE`; any other
    is refused, as are amounts that no longer add up (charged + concession = gross).
    """
    fixed = sorted(set(corrections) - CORRECTABLE)
    if fixed:
        raise SettlementStateError(
            f"a representment corrects only {', '.join(sorted(CORRECTABLE))}, "
            f"not {', '.join(fixed)}: it must be the same trip"
        )
    db = store.db
    with db.write():
        dispute = db.one(
            "SELECT period, state, code FROM disputes WHERE counterparty = ? AND operator_id = ? "
            "AND trip_id = ?",
            (counterparty, operator_id, trip_id),
        )
        if dispute is None:
            raise SettlementStateError(f"no dispute for {operator_id}/{trip_id}")
        if dispute[1] != "open":
            raise SettlementStateError(
                f"dispute {operator_id}/{trip_id} is {dispute[1]}: a line is represented once"
            )
        allowed = CORRECTABLE_BY_CODE.get(str(dispute[2]), frozenset())
        beyond = sorted(set(corrections) - allowed)
        if beyond:
            may = ", ".join(sorted(allowed)) or "nothing (present it again unchanged)"
            raise SettlementStateError(
                f"the dispute is {dispute[2]}: a representment of it may correct {may}, "
                f"not {', '.join(beyond)}"
            )
        row = store.trips.one(
            f"SELECT {TRIP_COLUMNS} FROM trips WHERE operator_id = ? AND trip_id = ?",
            (operator_id, trip_id),
        )
        if row is None:
            raise SettlementStateError(f"trip {operator_id}/{trip_id} is not in the ledger")
        trip = replace(trip_from_row(row), **corrections)
        if trip.charged_fen + trip.concession_fen != trip.gross_fare_fen:
            raise SettlementStateError(
                f"corrected amounts of {operator_id}/{trip_id} do not add up: charged "
                f"{trip.charged_fen} + concession {trip.concession_fen} fen is not the gross "
                f"{trip.gross_fare_fen} fen"
            )
        day = str(dispute[0])
        seq = next_seq(db, counterparty, day)
        payload = b64(encode_lines([line_for(trip)]))
        db.execute(
            "INSERT INTO out_batches (counterparty, period, seq, kind, lo, hi, payload, "
            "state, created_at) VALUES (?, ?, ?, 'represent', 0, 0, ?, 'built', ?)",
            (counterparty, day, seq, payload, now),
        )
        db.execute(
            "UPDATE disputes SET state = 'represented', represent_seq = ?, updated_at = ? "
            "WHERE counterparty = ? AND operator_id = ? AND trip_id = ?",
            (seq, now, counterparty, operator_id, trip_id),
        )
    return seq, date.fromisoformat(day)


def resolve(db: Db, now: str, counterparty: str, operator_id: str, trip_id: str, note: str) -> None:
    """Close a dispute by hand (after a final rejection, or instead of representing)."""
    if not note.strip():
        raise SettlementStateError("a resolution needs a note")
    with db.write():
        n = db.execute(
            "UPDATE disputes SET state = 'resolved', note = ?, updated_at = ? "
            "WHERE counterparty = ? AND operator_id = ? AND trip_id = ? "
            "AND state IN ('open', 'final')",
            (note, now, counterparty, operator_id, trip_id),
        )
    if n != 1:
        raise SettlementStateError(
            f"no open or finally rejected dispute for {operator_id}/{trip_id}"
        )
