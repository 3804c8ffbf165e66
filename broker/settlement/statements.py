"""Statements: what operators are owed for a day's trips, per card-holders' home district.

Each line's claim is computed on its own (``Agreement.claim_fen``, rounded per
line), then summed: the statement equals the sum of its lines, to the fen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from broker.fares.agreements import Agreement
from broker.fares.rules import FareSchedule
from broker.settlement.trips import Trip


@dataclass
class StatementLine:
    """One home district's share of a statement. Integer fen.

    ``claimed_fen`` is split by where each part stands (see
    :mod:`broker.settlement.clearing.reports`): not in a batch yet
    (``not_batched_fen``), in a batch not acknowledged (``in_batch_fen``), or
    acknowledged (the rest, as sent); of that, ``accepted_fen`` was accepted,
    ``disputed_fen`` is in dispute and ``settled_fen`` is SETTLED.
    """

    home_district: str
    trips: int = 0
    gross_fen: int = 0
    charged_fen: int = 0
    concession_fen: int = 0
    claimed_fen: int = 0
    accepted_fen: int = 0
    rejected_trips: int = 0
    in_batch_fen: int = 0
    disputed_fen: int = 0
    settled_fen: int = 0
    not_batched_fen: int = 0


def scheme_of(trip: Trip, fares: FareSchedule | None) -> str | None:
    """The concession scheme a trip's applied entitlement fell under, by its fare version."""
    if fares is None or trip.applied_entitlement is None:
        return None
    table = fares.version(trip.fare_version)
    rule = table.rule_for(trip.operator_id, trip.scene, trip.place_id) if table else None
    if rule is None:
        return None
    return next(
        (c.scheme for c in rule.concessions if c.entitlement is trip.applied_entitlement), None
    )


def statement(
    trips: Iterable[Trip],
    own_district: str,
    agreement: Callable[[str], Agreement | None],
    fares: FareSchedule | None,
) -> list[StatementLine]:
    """Totals per home district; claims only from other districts with an agreement."""
    lines: dict[str, StatementLine] = {}
    for t in trips:
        home = t.card.issuer_region
        line = lines.setdefault(home, StatementLine(home))
        line.trips += 1
        line.gross_fen += t.gross_fare_fen
        line.charged_fen += t.charged_fen
        line.concession_fen += t.concession_fen
        terms = agreement(home) if home != own_district else None
        if terms is not None:
            line.claimed_fen += terms.claim_fen(
                t.charged_fen, t.concession_fen, scheme_of(t, fares)
            )
    return [lines[k] for k in sorted(lines)]
