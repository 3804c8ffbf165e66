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

from broker.cards.model import CardRef, DecisionSource, Entitlement, Scene
from broker.fares.rules import CHANGEOVER_GRACE, MAX_FARE_FEN, FareSchedule, FareTable

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
    # Decided by the offline policy (the card unverified) yet priced with an entitlement.
    OFFLINE_CONCESSION = "offline_concession"


@dataclass(frozen=True, slots=True)
class Trip:
    """One trip as an operator submits it. Amounts are integer fen.

    ``gate_id`` and ``decision_source`` are last and optional ("" and None when
    the operator sent none, and for every trip stored by the previous release).
    ``decision_source`` is where the gate's decision came from; only an
    ``OFFLINE_POLICY`` trip (the card not verified) is treated differently.
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
    decision_source: DecisionSource | None = None

    def digest(self) -> str:
        """Content hash: the same trip id with other content is a conflict, not a duplicate.

        The gate id and the decision source count only when there is one, so a
        trip stored without (by the previous release) keeps the digest it was
        stored with. ``\x01`` never occurs in a gate id: no two trips share a text.
        """
        card, entitlement = self.card, self.applied_entitlement
        text = (
            f"{self.operator_id}\x00{self.trip_id}\x00{card.issuer_region}\x00"
            f"{card.card_number}\x00{self.scene.value}\x00{self.place_id}\x00"
            f"{self.occurred_at.isoformat()}\x00{self.gross_fare_fen}\x00{self.charged_fen}\x00"
            f"{self.concession_fen}\x00{entitlement.value if entitlement else 0}\x00"
            f"{self.fare_version}"
        )
        if self.gate_id:
            text += "\x00" + self.gate_id
        if self.decision_source:
            text += f"\x01{self.decision_source.value}"
        return hashlib.sha256(text.encode()).hexdigest()

    def presentment_digest(self) -> str:
        """Hash of what makes this the trip it is, and which no dispute can be about.

        Who, which card, where, when, at which gate and on what the gate
        decided; not the entitlement applied, the amounts, the fare version,
        the scheme or the claim (see :data:`CORRECTABLE`). A representment must
        have the first presentment's. The gate id and the decision source count
        only when there is one, as in :meth:`digest`.
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
            *((f"\x01{self.decision_source.value}",) if self.decision_source else ()),
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
    price by an older, more generous table. (:class:`Judge` judges many at one ``now``.)
    """
    return Judge(now, known_districts, fares, late_window, changeover_grace)(trip)


# Since 1901 Asia/Shanghai's offset has been a whole number of hours, changed only at whole
# hours: the settlement day of an instant after 1970 is the same all through its UTC hour.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_HOUR = timedelta(hours=1)


class Judge:
    """:func:`judge` for many trips at one ``now``: the bounds worked out once, and what each
    fare lookup answered remembered (the fare schedule is immutable), so that judging a
    request of 10,000 trips costs little more than its comparisons."""

    def __init__(
        self,
        now: datetime,
        known_districts: frozenset[str],
        fares: FareSchedule | None,
        late_window: timedelta = DEFAULT_LATE_WINDOW,
        changeover_grace: timedelta = CHANGEOVER_GRACE,
    ) -> None:
        self._known = known_districts
        self._fares = fares
        self._latest = now + CLOCK_SKEW
        self._earliest = now - late_window
        self._hours = int(late_window.total_seconds() // 3600)
        self._grace = changeover_grace
        self._tables: dict[str, FareTable | None] = {}
        self._in_force: dict[tuple[str, int, int], bool] = {}
        self._gross: dict[tuple[str, str, Scene, str], int] = {}

    def __call__(self, trip: Trip) -> Judgement:
        if trip.card.issuer_region not in self._known:
            return Judgement(
                Outcome.REJECTED,
                Reason.UNKNOWN_DISTRICT,
                f"no agreement with district {trip.card.issuer_region}",
            )
        gross, charged, concession = trip.gross_fare_fen, trip.charged_fen, trip.concession_fen
        if not (
            0 <= gross <= MAX_FARE_FEN
            and 0 <= charged <= MAX_FARE_FEN
            and 0 <= concession <= MAX_FARE_FEN
        ):
            return Judgement(
                Outcome.REJECTED, Reason.BAD_AMOUNTS, f"amounts must be 0-{MAX_FARE_FEN} fen"
            )
        if charged + concession != gross:
            return Judgement(
                Outcome.REJECTED, Reason.BAD_AMOUNTS, "charged + concession must equal gross"
            )
        if trip.decision_source is DecisionSource.OFFLINE_POLICY and (
            concession or trip.applied_entitlement is not None
        ):
            return Judgement(
                Outcome.REJECTED,
                Reason.OFFLINE_CONCESSION,
                "decision_source OFFLINE_POLICY: an unverified card gets no entitlement "
                "or concession",
            )
        at = trip.occurred_at
        if at > self._latest:
            return Judgement(Outcome.REJECTED, Reason.IN_FUTURE, "occurred_at is in the future")
        if at < self._earliest:
            return Judgement(
                Outcome.REJECTED, Reason.TOO_LATE, f"occurred more than {self._hours} h ago"
            )
        fares = self._fares
        if fares is None:
            return ACCEPT
        version = trip.fare_version
        try:
            table = self._tables[version]
        except KeyError:
            table = self._tables[version] = fares.version(version)
        if table is None:
            return Judgement(
                Outcome.REJECTED,
                Reason.UNKNOWN_FARE_VERSION,
                f"fare rules {version!r} were never published here",
            )
        if not self._was_in_force(fares, version, at):
            return Judgement(
                Outcome.REJECTED,
                Reason.UNKNOWN_FARE_VERSION,
                f"fare rules {version} were not in force at {at.isoformat(timespec='seconds')}",
            )
        key = (version, trip.operator_id, trip.scene, trip.place_id)
        expected = self._gross.get(key)
        if expected is None:
            rule = table.rule_for(trip.operator_id, trip.scene, trip.place_id)
            expected = self._gross[key] = rule.gross_fare_fen if rule else 0
        if expected != gross:
            return Judgement(
                Outcome.REJECTED,
                Reason.PRICE_MISMATCH,
                f"gross fare is {expected} fen under rules {version}",
            )
        return ACCEPT

    def _was_in_force(self, fares: FareSchedule, version: str, at: datetime) -> bool:
        """``fares.in_force(version, at, grace)``, which depends on ``at`` only through the
        settlement days of ``at`` and of ``at - grace``: remembered by their UTC hours."""
        since = at - _EPOCH  # exact (a float timestamp could round across an hour)
        before = since - self._grace
        if before < timedelta(0):
            return fares.in_force(version, at, self._grace)
        key = (version, since // _HOUR, before // _HOUR)
        held = self._in_force.get(key)
        if held is None:
            held = self._in_force[key] = fares.in_force(version, at, self._grace)
        return held
