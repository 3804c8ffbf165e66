"""What both ledger stores decide the same way."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from broker.cards.model import CardRef, DecisionSource, Entitlement, Scene
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


# Read as ``SELECT {TRIP_COLUMNS} FROM trips``: the gate id and the decision source live in
# ``trip_gates`` (ledger migrations 3 and 4), so the rows the previous release wrote stay as
# they were. Both in one lookup, as ``gate|source`` (NULL: neither was sent; a gate id may
# hold ``|``, a source is a number: :func:`gate_and_source` splits at the last one).
TRIP_COLUMNS = (
    "operator_id, trip_id, issuer_region, card_number, scene, place_id, occurred_at, "
    "gross_fare_fen, charged_fen, concession_fen, applied_entitlement, fare_version, "
    "(SELECT gate_id || '|' || decision_source FROM trip_gates "
    "WHERE trip_gates.operator_id = trips.operator_id "
    "AND trip_gates.trip_id = trips.trip_id) AS gate_and_source"
)


def gate_and_source(stored: str | None) -> tuple[str, int]:
    """The gate id and the decision source's value (0: none) of a ``gate_and_source``."""
    if not stored:
        return "", 0
    gate, _, source = stored.rpartition("|")
    return gate, int(source)


def trip_from_row(row: tuple[Any, ...]) -> Trip:
    """A stored trip (columns in :data:`TRIP_COLUMNS` order) back as a :class:`Trip`."""
    occurred = row[6]
    gate, source = gate_and_source(row[12])
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
        gate_id=gate,
        decision_source=DecisionSource(source) if source else None,
    )


# What makes two trips the same tap, with the instant: operator, card, gate and place.
Tap = tuple[str, str, str, str, str]


def tap_of(trip: Trip) -> Tap:
    return (
        trip.operator_id,
        trip.card.issuer_region,
        trip.card.card_number,
        trip.gate_id,
        trip.place_id,
    )


def has_gate(trip: Trip) -> bool:  # a row in trip_gates: a gate id or a decision source
    return bool(trip.gate_id or trip.decision_source)


def gate_row(trip: Trip) -> tuple[str, str, str, int]:
    source = trip.decision_source
    return (trip.operator_id, trip.trip_id, trip.gate_id, source.value if source else 0)


def tap_spans(trips: list[Trip], window: timedelta) -> list[tuple[str, datetime, datetime]]:
    """``(card number, earliest, latest)``: the instants within ``window`` of ``trips``' own,
    per card, overlapping ranges merged, so a stored tap falls in one range at most (a card
    tapped at a hundred gates at once is one range, not a hundred that each find them all)."""
    spans: list[tuple[str, datetime, datetime]] = []
    for t in sorted(trips, key=lambda t: (t.card.card_number, t.occurred_at)):
        card, lo, hi = t.card.card_number, t.occurred_at - window, t.occurred_at + window
        if spans and spans[-1][0] == card and lo <= spans[-1][2]:
            spans[-1] = (card, spans[-1][1], max(hi, spans[-1][2]))
        else:
            spans.append((card, lo, hi))
    return spans
