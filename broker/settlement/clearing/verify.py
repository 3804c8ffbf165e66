"""The home district's checks on one line of a batch, and the cap counting across districts.

A line is checked against what the home district knows, in this order (the
first failure is the code): the card is this district's (``WRONG_DISTRICT``)
and the trip is of the batch's day (``WRONG_DAY``); the card is known
(``UNKNOWN_CARD``) and a gate may still have held an ACTIVE answer about it
from its cache at the time of travel (``CARD_NOT_ACTIVE``: ACTIVE as the
registry had recorded it at some instant of the home's advertised TTL before
the trip), and the applied entitlement is one such an answer gave (age on the
day of travel, flags as recorded; ``ENTITLEMENT_MISMATCH``); the fare version was
published by the sender and in force when the trip occurred, or within
``[fares] changeover_grace_s`` of a change (``UNPUBLISHED_FARES``); the
amounts and scheme are what those rules give (``PRICE_MISMATCH``); the claim
is what the agreement gives (``CLAIM_MISMATCH``). Before all but the first, the trip must not have
been received before (``DUPLICATE``; a representment must follow a first
rejection, ``NOT_DISPUTED``, be the same trip: the same card, place, time
and gate, ``NOT_SAME_TRIP``, and correct only what the rejection was about,
``CORRECTABLE_BY_CODE`` of :mod:`broker.settlement.trips`, ``BEYOND_DISPUTE``).
A line the gate decided by its offline policy (``decision_source``
``OFFLINE_POLICY``: no answer was given, the card was not verified) is judged
on the card as the agreement's ``offline_risk`` says: ``"operator"``, ACTIVE as
recorded at the instant of travel (no cached answer to honour), else
``CARD_NOT_ACTIVE``; ``"home"``, any card this district issued. It may claim no
entitlement (``ENTITLEMENT_MISMATCH``), so it claims the standard fare at most.
A concession over a cap of its scheme (per card-holder,
per month and per year, counted across every district, this district's own
operators included) keeps its fare but loses its concession claim
(``CAP_EXCEEDED``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from broker.cards.csv_import import CardRow
from broker.cards.entitlements import entitlements_for
from broker.cards.model import SHANGHAI, CardStatus, DecisionSource, Entitlement, shanghai_day
from broker.cards.registry import (
    CardChange,
    Registry,
    answers_between,
    oldest_answer_in_force,
)
from broker.core.db import Db
from broker.fares.agreements import Agreement
from broker.fares.rules import CapScheme, FareTable, Price, cap_of
from broker.settlement.clearing.batch import Line
from broker.settlement.trips import CORRECTABLE_BY_CODE, corrected_fields

OK = "ACCEPTED"
CAP_EXCEEDED = "CAP_EXCEEDED"
REJECTIONS = frozenset(
    {
        "WRONG_DISTRICT",
        "WRONG_DAY",
        "UNKNOWN_CARD",
        "CARD_NOT_ACTIVE",
        "ENTITLEMENT_MISMATCH",
        "UNPUBLISHED_FARES",
        "PRICE_MISMATCH",
        "CLAIM_MISMATCH",
        "DUPLICATE",
        "NOT_DISPUTED",
        "NOT_SAME_TRIP",
        "BEYOND_DISPUTE",
    }
)


def claim(agreement: Agreement | None, charged: int, concession: int, scheme: str) -> int:
    if agreement is None:
        return 0
    return agreement.claim_fen(charged, concession, scheme or None)


@dataclass
class CapCounter:
    """Uses of each capped scheme per card-holder, loaded from ``cap_usage`` as needed.

    The counts are read once and then kept: use it inside the transaction that
    holds the home district's verification lock (:class:`broker.settlement.clearing.receiver.
    Receiver`), so no other replica counts the same holder meanwhile.
    """

    db: Db
    counts: dict[tuple[str, str, str], int] = field(default_factory=dict)
    _periods: dict[date, tuple[str, str]] = field(default_factory=dict)  # day → (month, year)

    def _month_year(self, day: date) -> tuple[str, str]:
        found = self._periods.get(day)
        if found is None:
            found = self._periods[day] = (day.strftime("%Y-%m"), str(day.year))
        return found

    def used(self, holder: str, scheme: str, period_key: str, column: str) -> int:
        key = (holder, scheme, period_key)
        if key not in self.counts:
            row = self.db.one(
                f"SELECT count(*) FROM cap_usage WHERE holder_key = ? AND scheme = ? "
                f"AND {column} = ?",
                (holder, scheme, period_key),
            )
            self.counts[key] = int(row[0]) if row else 0
        return self.counts[key]

    def allows(
        self, holder: str, scheme: str, day: date, per_month: int | None, per_year: int | None
    ) -> bool:
        month, year = self._month_year(day)
        if per_month is not None and self.used(holder, scheme, month, "month") >= per_month:
            return False
        return per_year is None or self.used(holder, scheme, year, "year") < per_year

    def count(self, source: str, holder: str, scheme: str, day: date, occurred: str) -> None:
        month, year = self._month_year(day)
        self.used(holder, scheme, month, "month")
        self.used(holder, scheme, year, "year")
        if self.db.execute(
            "INSERT INTO cap_usage (source, holder_key, scheme, month, year, occurred_at) VALUES "
            "(?, ?, ?, ?, ?, ?) ON CONFLICT (source) DO NOTHING",
            (source, holder, scheme, month, year, occurred),
        ):
            self.counts[(holder, scheme, month)] += 1
            self.counts[(holder, scheme, year)] += 1


@dataclass
class LineChecker:
    """Checks the lines of one batch from ``sender`` for settlement day ``period``."""

    own_district: str
    sender: str
    period: date
    registry: Registry
    fare_table: Callable[[str], FareTable | None]  # the sender's published rules by version
    # Whether a version was the one in force at an instant (or within the changeover grace).
    fares_in_force: Callable[[str, datetime], bool]
    agreement: Agreement | None
    caps: CapCounter
    previous: Callable[[str, str], tuple[str, int] | None]  # (operator, trip) → (code, attempt)
    representment: bool = False
    # (operator, trip) → the first presentment's Trip.presentment_digest (None: stored by
    # the previous release, which kept none).
    presented: Callable[[str, str], tuple[str, str | None] | None] = lambda _op, _trip: None
    # With the changeover grace the sender's rules are judged by, ``fares_in_force`` is
    # asked once per version and pair of days (it depends on an instant only through the
    # Shanghai days of it and of it less the grace), not once per line.
    changeover_grace: timedelta | None = None
    _bounds: tuple[datetime, datetime] | None = None  # the period's first and next instants
    _in_force: dict[tuple[str, date, date], bool] = field(default_factory=dict)
    _known_by: dict[str, datetime | None] = field(default_factory=dict)  # card → last known_from
    _caps: dict[tuple[str, str], CapScheme | None] = field(default_factory=dict)  # by version
    _cards: dict[str, CardRow | None] = field(default_factory=dict)
    _ttls: list[tuple[datetime, int]] | None = None
    _histories: dict[str, list[CardChange]] = field(default_factory=dict)  # card → its changes
    # (card, day of the oldest answer, day of travel) → entitlements held, for unchanged cards
    _answers: dict[tuple[str, date, date], frozenset[Entitlement] | None] = field(
        default_factory=dict
    )
    _prices: dict[tuple[Any, ...], Price] = field(default_factory=dict)  # (version, …) → price
    _ttl: timedelta | None = None  # the one advertised TTL, when there is one
    _claims: dict[tuple[int, int, str], int] = field(default_factory=dict)  # the agreement's

    def _claim(self, charged: int, concession: int, scheme: str) -> int:
        """:func:`claim` under this batch's agreement, worked out once per set of amounts."""
        key = (charged, concession, scheme)
        found = self._claims.get(key)
        if found is None:
            if len(self._claims) > 100_000:
                self._claims.clear()
            found = self._claims[key] = claim(self.agreement, charged, concession, scheme)
        return found

    def _card(self, number: str) -> CardRow | None:
        if number not in self._cards:
            if len(self._cards) > 100_000:
                self._cards.clear()
            self._cards[number] = self.registry.lookup(number)
        return self._cards[number]

    def _history(self, number: str) -> list[CardChange]:
        if number not in self._histories:
            if len(self._histories) > 100_000:
                self._histories.clear()
                self._known_by.clear()
            changes = self._histories[number] = self.registry.history(number)
            self._known_by[number] = max((c.known_from for c in changes), default=None)
        return self._histories[number]

    def _day_of(self, at: datetime) -> date:
        """:func:`shanghai_day`, without the time-zone arithmetic for instants of the period."""
        if self._bounds is None:  # in UTC: instants of one tzinfo compare without offsets
            start = datetime.combine(self.period, time(), SHANGHAI).astimezone(UTC)
            end = datetime.combine(self.period + timedelta(days=1), time(), SHANGHAI)
            self._bounds = (start, end.astimezone(UTC))
        start, end = self._bounds
        return self.period if start <= at < end else shanghai_day(at)

    def _fares_in_force(self, version: str, at: datetime) -> bool:
        grace = self.changeover_grace
        if grace is None:
            return self.fares_in_force(version, at)
        key = (version, self._day_of(at), self._day_of(at - grace))
        found = self._in_force.get(key)
        if found is None:
            found = self._in_force[key] = self.fares_in_force(version, at)
        return found

    def _held(
        self, card: CardRow, since: datetime, until: datetime, day: date
    ) -> frozenset[Entitlement] | None:
        """The entitlements an ACTIVE answer in [since, until] gave the holder (``None``: no
        answer in it was ACTIVE). Lines of a card that did not change since before ``since``
        all get the same answers for a day: worked out once per (card, day)."""
        changes = self._history(card.card_number)
        known_by = self._known_by[card.card_number]
        settled = known_by is None or known_by <= since  # no change known after ``since``
        key = (card.card_number, self._day_of(since), day)
        if settled and key in self._answers:
            return self._answers[key]
        active = [
            a for a in answers_between(changes, since, until) if a.status is CardStatus.ACTIVE
        ]
        held = (
            frozenset(
                e
                for a in active
                for e in entitlements_for(card.birth_date, a.disabled, a.student, day)
            )
            if active
            else None
        )
        if settled:
            if len(self._answers) > 100_000:
                self._answers.clear()
            self._answers[key] = held
        return held

    def check(self, line: Line) -> tuple[str, int]:
        """``(code, accepted claim in fen)`` for one line; records cap usage when accepted."""
        t = line.trip
        day = self._day_of(t.occurred_at)
        if t.card.issuer_region != self.own_district:
            return "WRONG_DISTRICT", 0
        before = self.previous(t.operator_id, t.trip_id)
        if self.representment:
            if before is None or before[0] not in REJECTIONS or before[1] != 1:
                return "NOT_DISPUTED", 0
            first = self.presented(t.operator_id, t.trip_id)
            if first is not None and first[1] is not None:
                beyond = corrected_fields(first[1], t) - CORRECTABLE_BY_CODE.get(
                    before[0], frozenset()
                )
                if beyond:
                    return "BEYOND_DISPUTE", 0  # corrects what the rejection was not about
            if first is not None and first[0] != t.presentment_digest():
                return "NOT_SAME_TRIP", 0  # another card, place, time or gate: not a correction
        elif before is not None:
            return "DUPLICATE", 0
        if day != self.period:
            return "WRONG_DAY", 0
        card = self._card(t.card.card_number)
        if card is None:
            return "UNKNOWN_CARD", 0
        if t.decision_source is DecisionSource.OFFLINE_POLICY:
            return self._offline(line, card, day)
        # The home bears the risk of the TTL it advertised: any answer a gate may still have
        # held from its cache at the time of travel, as the registry had recorded it, will do.
        if self._ttls is None:  # read once per batch: they change only when a node starts
            self._ttls = self.registry.advertised_ttls()
        if len(self._ttls) == 1 and self._ttls[0][1] >= 0:
            # One TTL ever advertised: the oldest answer in force was given that long before.
            if self._ttl is None:
                self._ttl = timedelta(seconds=self._ttls[0][1])
            since = t.occurred_at - self._ttl
        else:
            since = oldest_answer_in_force(self._ttls, t.occurred_at)
        held = self._held(card, since, t.occurred_at, day)
        if held is None:
            return "CARD_NOT_ACTIVE", 0
        if t.applied_entitlement is not None and t.applied_entitlement not in held:
            return "ENTITLEMENT_MISMATCH", 0
        return self._priced(line, card, day)

    def _offline(self, line: Line, card: CardRow, day: date) -> tuple[str, int]:
        """A line allowed by the gate's offline policy: no answer was given, so none is
        honoured; who bears a card that was not valid is the agreement's ``offline_risk``."""
        t = line.trip
        if t.applied_entitlement is not None:
            return "ENTITLEMENT_MISMATCH", 0  # an unverified card is given no entitlement
        risk = self.agreement.offline_risk if self.agreement else "operator"
        if risk == "operator" and self._held(card, t.occurred_at, t.occurred_at, day) is None:
            return "CARD_NOT_ACTIVE", 0  # not ACTIVE, as recorded, when the trip occurred
        return self._priced(line, card, day)

    def _priced(self, line: Line, card: CardRow, day: date) -> tuple[str, int]:
        """The fare, claim and cap checks of a line whose card and entitlement held."""
        t = line.trip
        table = self.fare_table(t.fare_version)
        if table is None or not self._fares_in_force(t.fare_version, t.occurred_at):
            return "UNPUBLISHED_FARES", 0
        key = (t.fare_version, t.operator_id, t.scene, t.place_id, t.applied_entitlement)
        price = self._prices.get(key)
        if price is None:
            applied = [t.applied_entitlement] if t.applied_entitlement else []
            price = self._prices[key] = table.price(t.operator_id, t.scene, t.place_id, applied)
        if (
            price.gross_fare_fen,
            price.charged_fen,
            price.concession_fen,
            price.applied_entitlement,
            price.scheme or "",
        ) != (
            t.gross_fare_fen,
            t.charged_fen,
            t.concession_fen,
            t.applied_entitlement,
            line.scheme,
        ):
            return "PRICE_MISMATCH", 0
        if self._claim(t.charged_fen, t.concession_fen, line.scheme) != line.claimed_fen:
            return "CLAIM_MISMATCH", 0
        if line.scheme and t.concession_fen:
            cap_key = (t.fare_version, line.scheme)
            if cap_key not in self._caps:
                self._caps[cap_key] = cap_of(table, line.scheme)
            cap = self._caps[cap_key]
            if cap is not None:
                if not self.caps.allows(
                    card.holder_key, line.scheme, day, cap.per_month, cap.per_year
                ):
                    return CAP_EXCEEDED, self._claim(t.charged_fen, 0, "")
                source = f"{self.sender}|{t.operator_id}|{t.trip_id}"
                self.caps.count(
                    source, card.holder_key, line.scheme, day, t.occurred_at.isoformat()
                )
        return OK, line.claimed_fen
