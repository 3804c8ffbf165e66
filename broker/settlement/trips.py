"""Trips submitted by operators: validation, and the outcome each one gets.

A trip is one priced use of a card at this district's gates. Operators submit
them in batches; each trip is judged on its own, so one bad line never costs
the good ones. The reasons a trip is refused are codes operators can act on.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from broker.cards.model import CardRef, Entitlement, Scene
from broker.fares.rules import CHANGEOVER_GRACE, MAX_FARE_FEN, FareSchedule

DEFAULT_LATE_WINDOW = timedelta(hours=72)
# The same tap at one gate uploaded twice under two trip ids lands this close.
DEFAULT_DUPLICATE_WINDOW = timedelta(seconds=5)
CLOCK_SKEW = timedelta(minutes=5)


class Outcome(enum.StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    CONFLICT = "conflict"  # the same (operator, trip id) was stored with other content


class Reason(enum.StrEnum):
    OK = "ok"
    MALFORMED = "malformed"
    OPERATOR_MISMATCH = "operator_mismatch"
    UNKNOWN_DISTRICT = "unknown_district"
    BAD_AMOUNTS = "bad_amounts"
    IN_FUTURE = "in_future"
    TOO_LATE = "too_late"
    UNKNOWN_FARE_VERSION = "unknown_fare_version"
    PRICE_MISMATCH = "price_mismatch"
    DUPLICATE_CONTENT_DIFFERS = "duplicate_content_differs"
    # The same operator, card, gate and place within the duplicate window of an
    # accepted trip under another trip id (broker.settlement.ledger.store).
    SUSPECTED_DUPLICATE = "suspected_duplicate"


@dataclass(frozen=True, slots=True)
class Trip:
    """One trip as an operator submits it. Amounts are integer fen.

    ``gate_id`` is last and optional ("" when the operator sent none, and for
    every trip stored by the previous release).
    """

    operator_id: str
    trip_id: str
    card: CardRef
    scene: Scene
    place_id: str
    occurred_at: datetime
    gross_fare_fen: int
    charged_fen: int
    concession_fen: int
    applied_entitlement: Entitlement | None
    fare_version: str
    gate_id: str = ""

    def digest(self) -> str:
        """Content hash: the same trip id with other content is a conflict, not a duplicate.

        The gate id counts only when there is one, so a trip stored without
        one (by the previous release) keeps the digest it was stored with.
        """
        fields = (
            self.operator_id,
            self.trip_id,
            self.card.issuer_region,
            self.card.card_number,
            str(self.scene.value),
            self.place_id,
            self.occurred_at.isoformat(),
            str(self.gross_fare_fen),
            str(self.charged_fen),
            str(self.concession_fen),
            str(self.applied_entitlement.value if self.applied_entitlement else 0),
            self.fare_version,
            *((self.gate_id,) if self.gate_id else ()),
        )
        return hashlib.sha256("\x00".join(fields).encode()).hexdigest()

    def presentment_digest(self) -> str:
        """Hash of what makes this the trip it is, and which no dispute can be about.

        Who, which card, where, when and at which gate; not the entitlement
        applied, the amounts, the fare version, the scheme or the claim (see
        :data:`CORRECTABLE`). A representment must have the first presentment's.
        The gate id counts only when there is one, as in :meth:`digest`.
        """
        fields = (
            self.operator_id,
            self.trip_id,
            self.card.issuer_region,
            self.card.card_number,
            str(self.scene.value),
            self.place_id,
            self.occurred_at.astimezone(UTC).isoformat(),
            *((self.gate_id,) if self.gate_id else ()),
        )
        return hashlib.sha256("\x00".join(fields).encode()).hexdigest()

    def __repr__(self) -> str:
        return f"Trip({self.operator_id}/{self.trip_id}, card=<redacted>)"


# The fields a representment may correct: what a home district's rejection can
# be about (the price and the entitlement it was priced for), nothing that
# says which trip it was (:meth:`Trip.presentment_digest`).
CORRECTABLE = frozenset(
    {"applied_entitlement", "gross_fare_fen", "charged_fen", "concession_fen", "fare_version"}
)
# What a representment may correct, by the home district's first rejection: only what the
# dispute was about. A rejection of the card, the day or the claim itself corrects nothing
# in the trip: its line may be presented again unchanged (the home fixed its records, or the
# claim is recomputed under the agreement).
CORRECTABLE_BY_CODE: dict[str, frozenset[str]] = {
    "ENTITLEMENT_MISMATCH": frozenset(
        {"applied_entitlement", "gross_fare_fen", "charged_fen", "concession_fen"}
    ),
    "PRICE_MISMATCH": CORRECTABLE,
    "UNPUBLISHED_FARES": CORRECTABLE,
}
_CORRECTABLE_ORDER = (
    "applied_entitlement",
    "gross_fare_fen",
    "charged_fen",
    "concession_fen",
    "fare_version",
)


def correctable_values(trip: Trip) -> str:
    """The first presentment's correctable fields, as the home keeps them (no card data)."""
    entitlement = trip.applied_entitlement.value if trip.applied_entitlement else 0
    values = (entitlement, trip.gross_fare_fen, trip.charged_fen, trip.concession_fen)
    return "|".join([*(str(v) for v in values), trip.fare_version])


def corrected_fields(first: str, trip: Trip) -> set[str]:
    """Which correctable fields ``trip`` changes against a first presentment's values."""
    pairs = zip(first.split("|", 4), correctable_values(trip).split("|", 4), strict=True)
    return {name for name, (a, b) in zip(_CORRECTABLE_ORDER, pairs, strict=True) if a != b}


@dataclass(frozen=True, slots=True)
class Judgement:
    outcome: Outcome
    reason: Reason
    detail: str = ""


ACCEPT = Judgement(Outcome.ACCEPTED, Reason.OK)


def judge(
    trip: Trip,
    now: datetime,
    known_districts: frozenset[str],
    fares: FareSchedule | None,
    late_window: timedelta = DEFAULT_LATE_WINDOW,
    changeover_grace: timedelta = CHANGEOVER_GRACE,
) -> Judgement:
    """Whether a trip may enter the ledger; the first problem found is the reason.

    Its fare version must be the one in force when it occurred (or, within
    ``changeover_grace`` of a change, the one before): an operator cannot
    price by an older, more generous table.
    """

    def reject(reason: Reason, detail: str) -> Judgement:
        return Judgement(Outcome.REJECTED, reason, detail)

    if trip.card.issuer_region not in known_districts:
        return reject(
            Reason.UNKNOWN_DISTRICT, f"no agreement with district {trip.card.issuer_region}"
        )
    amounts = (trip.gross_fare_fen, trip.charged_fen, trip.concession_fen)
    if any(a < 0 or a > MAX_FARE_FEN for a in amounts):
        return reject(Reason.BAD_AMOUNTS, f"amounts must be 0-{MAX_FARE_FEN} fen")
    if trip.charged_fen + trip.concession_fen != trip.gross_fare_fen:
        return reject(Reason.BAD_AMOUNTS, "charged + concession must equal gross")
    if trip.occurred_at > now + CLOCK_SKEW:
        return reject(Reason.IN_FUTURE, "occurred_at is in the future")
    if trip.occurred_at < now - late_window:
        hours = int(late_window.total_seconds() // 3600)
        return reject(Reason.TOO_LATE, f"occurred more than {hours} h ago")
    if fares is not None:
        table = fares.version(trip.fare_version)
        if table is None:
            return reject(
                Reason.UNKNOWN_FARE_VERSION,
                f"fare rules {trip.fare_version!r} were never published here",
            )
        if not fares.in_force(trip.fare_version, trip.occurred_at, changeover_grace):
            return reject(
                Reason.UNKNOWN_FARE_VERSION,
                f"fare rules {trip.fare_version} were not in force at "
                f"{trip.occurred_at.isoformat(timespec='seconds')}",
            )
        rule = table.rule_for(trip.operator_id, trip.scene, trip.place_id)
        gross = rule.gross_fare_fen if rule else 0
        if gross != trip.gross_fare_fen:
            return reject(
                Reason.PRICE_MISMATCH, f"gross fare is {gross} fen under rules {trip.fare_version}"
            )
    return ACCEPT
