"""What both ledger stores decide the same way."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from broker.cards.model import CardRef, Entitlement, Scene
from broker.settlement.trips import Judgement, Outcome, Reason, Trip

CONFLICT = Judgement(
    Outcome.CONFLICT,
    Reason.DUPLICATE_CONTENT_DIFFERS,
    "this trip_id was submitted with other content",
)


def resubmitted(stored: tuple[str, str, str, str], trip: Trip) -> Judgement:
    """The answer for a trip whose id is already stored as ``(digest, outcome, reason, detail)``.

    The same content gets its stored outcome back (idempotence); other content
    under the same id is a conflict and changes nothing.
    """
    digest, outcome, reason, detail = stored
    if digest == trip.digest():
        return Judgement(Outcome(outcome), Reason(reason), detail)
    return CONFLICT


# Read as ``SELECT {TRIP_COLUMNS} FROM trips``: the gate id lives in ``trip_gates``
# (ledger migration 3), so the rows the previous release wrote stay as they were.
TRIP_COLUMNS = (
    "operator_id, trip_id, issuer_region, card_number, scene, place_id, occurred_at, "
    "gross_fare_fen, charged_fen, concession_fen, applied_entitlement, fare_version, "
    "coalesce((SELECT gate_id FROM trip_gates WHERE trip_gates.operator_id = trips.operator_id "
    "AND trip_gates.trip_id = trips.trip_id), '') AS gate_id"
)


def trip_from_row(row: tuple[Any, ...]) -> Trip:
    """A stored trip (columns in :data:`TRIP_COLUMNS` order) back as a :class:`Trip`."""
    occurred = row[6]
    if isinstance(occurred, str):
        occurred = datetime.fromisoformat(occurred)
    return Trip(
        operator_id=row[0],
        trip_id=row[1],
        card=CardRef(row[2], row[3]),
        scene=Scene(row[4]),
        place_id=row[5],
        occurred_at=occurred.astimezone(UTC),
        gross_fare_fen=int(row[7]),
        charged_fen=int(row[8]),
        concession_fen=int(row[9]),
        applied_entitlement=Entitlement(row[10]) if row[10] else None,
        fare_version=row[11],
        gate_id=row[12] or "",
    )
