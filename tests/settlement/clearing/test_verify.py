"""The home district's line checks (broker.settlement.clearing.verify), called directly.

A real registry (cards imported at known instants, one lost during the day),
the testbed's sample fare rules and agreement terms, and cap usage in a real
clearing table. Amounts and claims are written out by hand (tests/settlement/
clearing/pair.py), so a line "as the rules give" is not priced by the code
under test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.cards.csv_import import CardRow
from broker.cards.model import CardRef, DecisionSource, Entitlement, Scene
from broker.cards.registry import Registry
from broker.core.db import Db, migrate
from broker.fares.agreements import Agreement
from broker.fares.rules import FareSchedule, FareTable
from broker.settlement.clearing.batch import Line
from broker.settlement.clearing.store import MIGRATIONS
from broker.settlement.clearing.verify import (
    CAP_EXCEEDED,
    OK,
    REJECTIONS,
    CapCounter,
    LineChecker,
    claim,
)
from broker.settlement.trips import Trip, correctable_values
from broker.testbed.build import SAMPLE_AGREEMENT, SAMPLE_FARES
from tests.settlement.clearing.pair import (
    AT,
    CAPPED_FARES,
    DAY,
    HOME,
    ISSUED,
    SERVING,
    THIRD,
    card,
    line,
    registry_rows,
    sample_fares,
    trip,
)

AGREEMENT = Agreement(SERVING, **SAMPLE_AGREEMENT)  # the home district's terms with SERVING
LOST_AT = AT + timedelta(hours=1)
SHANGHAI_MIDNIGHT = datetime(2026, 3, 9, 16, 0, tzinfo=UTC)  # DAY begins, Asia/Shanghai


def table_of(text: str = SAMPLE_FARES, district: str = SERVING) -> FareTable:
    table = sample_fares(district, text).version("sample-1")
    assert table is not None
    return table


class Home:
    """HOME's registry and clearing tables; :meth:`checker` checks a batch from SERVING."""

    def __init__(self, root: Path) -> None:
        self.registry = Registry(root / "registry.sqlite3")
        self.registry.upsert(registry_rows(HOME), ISSUED)
        plain = self.registry.lookup(card(HOME, "plain").card_number)
        assert plain is not None
        # The plain card-holder reports the card lost an hour after the usual trip.
        self.registry.upsert([replace(plain, status="lost")], LOST_AT)
        # A card valid up to and including DAY; a card the registry learnt of only after AT.
        self.registry.upsert(
            [CardRow("C512021LASTDAY", "h-lastday", date(1990, 1, 1), "active", False, False, DAY)],
            ISSUED,
        )
        self.registry.upsert(
            [CardRow("C512021LATE", "h-late", date(1990, 1, 1), "active", False, False, DAY)],
            AT + timedelta(minutes=1),
        )
        self.db = Db.open(root / "clearing.sqlite3", None)
        migrate(self.db, "clearing", MIGRATIONS)

    def checker(
        self,
        table: FareTable | None = None,
        *,
        previous: Callable[[str, str], tuple[str, int] | None] = lambda op, tid: None,
        representment: bool = False,
        agreement: Agreement | None = AGREEMENT,
        period: date = DAY,
        sender: str = SERVING,
        newer: FareTable | None = None,
    ) -> LineChecker:
        tables = {"sample-1": table or table_of()}
        if newer is not None:
            tables[newer.version] = newer
        ordered = sorted(tables.values(), key=lambda t: t.effective_from)
        schedule = FareSchedule(sender, tuple(ordered))
        return LineChecker(
            own_district=HOME,
            sender=sender,
            period=period,
            registry=self.registry,
            fare_table=tables.get,
            fares_in_force=lambda version, at: schedule.in_force(version, at),
            agreement=agreement,
            caps=CapCounter(self.db),
            previous=previous,
            representment=representment,
        )

    def close(self) -> None:
        self.db.close()
        self.registry.close()


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    h = Home(tmp_path)
    yield h
    h.close()


def senior_free(trip_id: str, kind: str = "senior", at: datetime = AT) -> Line:
    return line(trip(card(HOME, kind), trip_id, Entitlement.SENIOR_65, at=at))


# ---------------------------------------------------------------- accepted lines


@pytest.mark.parametrize(
    ("kind", "scene", "entitlement", "claimed"),
    [
        ("senior", Scene.BUS, None, 200),  # a senior may well ride on a full fare
        ("senior", Scene.BUS, Entitlement.SENIOR_65, 200),
        ("senior", Scene.BUS, Entitlement.SENIOR_60, 150),  # a lesser one the holder also has
        ("student", Scene.BUS, Entitlement.STUDENT, 133),
        ("senior", Scene.SCENIC_AREA, Entitlement.SENIOR_60, 8625),
        ("plain", Scene.SCENIC_AREA, None, 11500),
    ],
)
def test_a_line_as_the_rules_and_agreement_give_is_accepted_with_its_claim(
    home: Home, kind: str, scene: Scene, entitlement: Entitlement | None, claimed: int
) -> None:
    t = trip(card(HOME, kind), "t-1", entitlement, scene=scene)
    assert home.checker().check(line(t)) == (OK, claimed)


def test_claim_follows_the_agreement_and_is_zero_without_one() -> None:
    assert claim(AGREEMENT, 100, 100, "senior-bus-half") == 150
    assert claim(AGREEMENT, 100, 100, "") == 100  # no scheme: no concession share
    assert claim(Agreement(SERVING), 100, 100, "senior-bus-half") == 0  # nothing collected
    assert claim(None, 200, 0, "") == 0


# ---------------------------------------------------------------- rejections, in order


def test_a_card_of_another_district_is_refused_before_any_other_check(home: Home) -> None:
    t = trip(card(THIRD, "plain"), "t-1", at=AT + timedelta(days=3))
    checker = home.checker(previous=lambda op, tid: ("ACCEPTED", 1))  # also a duplicate
    assert checker.check(line(t)) == ("WRONG_DISTRICT", 0)


@pytest.mark.parametrize(
    ("at", "code"),
    [
        (SHANGHAI_MIDNIGHT - timedelta(microseconds=1), "WRONG_DAY"),  # 23:59:59.999999 before
        (SHANGHAI_MIDNIGHT, OK),
        (SHANGHAI_MIDNIGHT + timedelta(days=1) - timedelta(microseconds=1), OK),
        (SHANGHAI_MIDNIGHT + timedelta(days=1), "WRONG_DAY"),
    ],
)
def test_the_day_of_travel_is_the_shanghai_calendar_day(
    home: Home, at: datetime, code: str
) -> None:
    t = trip(card(HOME, "senior"), "t-1", at=at)
    assert home.checker().check(line(t))[0] == code


def test_a_card_the_registry_never_issued_is_unknown(home: Home) -> None:
    ghost = replace(card(HOME, "plain"), card_number="C5120219999999")
    assert home.checker().check(line(trip(ghost, "t-1"))) == ("UNKNOWN_CARD", 0)


@pytest.mark.parametrize(
    ("number", "at", "code"),
    [
        (card(HOME, "lost").card_number, AT, "CARD_NOT_ACTIVE"),
        (card(HOME, "expired").card_number, AT, "CARD_NOT_ACTIVE"),  # expired the day before
        ("C512021LASTDAY", AT, OK),  # valid until DAY inclusive
        (card(HOME, "plain").card_number, LOST_AT - timedelta(seconds=1), OK),
        (card(HOME, "plain").card_number, LOST_AT, "CARD_NOT_ACTIVE"),  # lost from that instant
        ("C512021LATE", AT, "CARD_NOT_ACTIVE"),  # not yet issued when used
    ],
)
def test_the_card_must_be_active_at_the_time_of_travel(
    home: Home, number: str, at: datetime, code: str
) -> None:
    ref = replace(card(HOME, "plain"), card_number=number)
    assert home.checker().check(line(trip(ref, "t-1", at=at))) == (
        code,
        200 if code == OK else 0,
    )


@pytest.mark.parametrize(
    ("kind", "entitlement", "period", "code"),
    [
        ("plain", Entitlement.SENIOR_65, DAY, "ENTITLEMENT_MISMATCH"),
        ("student", Entitlement.SENIOR_60, DAY, "ENTITLEMENT_MISMATCH"),
        ("turns65", Entitlement.SENIOR_65, DAY, "ENTITLEMENT_MISMATCH"),  # 64 that day
        ("turns65", Entitlement.SENIOR_60, DAY, OK),
        ("turns65", Entitlement.SENIOR_65, DAY + timedelta(days=1), OK),  # the 65th birthday
    ],
)
def test_the_applied_entitlement_must_be_held_that_day(
    home: Home, kind: str, entitlement: Entitlement, period: date, code: str
) -> None:
    at = AT + (period - DAY)
    t = trip(card(HOME, kind), "t-1", entitlement, at=at)
    assert home.checker(period=period).check(line(t))[0] == code


def test_a_fare_version_not_published_or_not_yet_in_force_is_refused(home: Home) -> None:
    ref = card(HOME, "senior")
    ghost = trip(ref, "t-1", version="ghost-9")
    assert home.checker().check(line(ghost)) == ("UNPUBLISHED_FARES", 0)
    later = replace(table_of(), effective_from=DAY + timedelta(days=1))
    assert home.checker(later).check(line(trip(ref, "t-2"))) == ("UNPUBLISHED_FARES", 0)
    from_today = replace(table_of(), effective_from=DAY)
    assert home.checker(from_today).check(line(trip(ref, "t-3"))) == (OK, 200)


@pytest.mark.parametrize(
    "change",
    [
        {"gross_fare_fen": 250, "charged_fen": 250},  # not the fare of the rules
        {"charged_fen": 150, "concession_fen": 50},  # half fare is 100 + 100
        {"applied_entitlement": None},  # a concession with no entitlement applied
        {"applied_entitlement": Entitlement.SENIOR_70},  # not a bus concession at all
    ],
)
def test_amounts_not_as_the_rules_give_are_a_price_mismatch(
    home: Home, change: dict[str, Any]
) -> None:
    t = trip(card(HOME, "senior"), "t-1", Entitlement.SENIOR_60)
    priced = line(replace(t, **change), claimed=150, scheme="senior-bus-half")
    assert home.checker().check(priced) == ("PRICE_MISMATCH", 0)


def test_a_scheme_other_than_the_rules_give_is_a_price_mismatch(home: Home) -> None:
    senior = trip(card(HOME, "senior"), "t-1", Entitlement.SENIOR_65)
    assert home.checker().check(line(senior, scheme="disabled-free"))[0] == "PRICE_MISMATCH"
    plain = trip(card(HOME, "senior"), "t-2")
    assert home.checker().check(line(plain, scheme="senior-bus-free"))[0] == "PRICE_MISMATCH"


@pytest.mark.parametrize("claimed", [149, 151, 0])
def test_a_claim_other_than_the_agreement_gives_is_refused(home: Home, claimed: int) -> None:
    t = trip(card(HOME, "senior"), "t-1", Entitlement.SENIOR_60)
    assert home.checker().check(line(t, claimed=claimed)) == ("CLAIM_MISMATCH", 0)


def test_without_an_agreement_only_a_claim_of_nothing_is_accepted(home: Home) -> None:
    t = trip(card(HOME, "plain"), "t-1")
    assert home.checker(agreement=None).check(line(t)) == ("CLAIM_MISMATCH", 0)
    assert home.checker(agreement=None).check(line(t, claimed=0)) == (OK, 0)


@pytest.mark.parametrize("before", [("ACCEPTED", 1), ("CARD_NOT_ACTIVE", 1), ("CAP_EXCEEDED", 1)])
def test_a_trip_received_before_is_a_duplicate_in_a_close(
    home: Home, before: tuple[str, int]
) -> None:
    asked: list[tuple[str, str]] = []

    def previous(op: str, trip_id: str) -> tuple[str, int]:
        asked.append((op, trip_id))
        return before

    t = trip(card(HOME, "senior"), "t-7", at=AT + timedelta(days=1))  # also the wrong day
    assert home.checker(previous=previous).check(line(t)) == ("DUPLICATE", 0)
    assert asked == [("transit-01", "t-7")]


@pytest.mark.parametrize(
    ("before", "code"),
    [
        (None, "NOT_DISPUTED"),  # never received
        (("ACCEPTED", 1), "NOT_DISPUTED"),
        (("CAP_EXCEEDED", 1), "NOT_DISPUTED"),  # a cap is not a dispute
        (("ENTITLEMENT_MISMATCH", 2), "NOT_DISPUTED"),  # represented once already
        (("ENTITLEMENT_MISMATCH", 1), OK),
    ],
)
def test_a_representment_must_follow_a_first_rejection(
    home: Home, before: tuple[str, int] | None, code: str
) -> None:
    corrected = line(trip(card(HOME, "plain"), "m-1"))
    checker = home.checker(previous=lambda op, tid: before, representment=True)
    assert checker.check(corrected)[0] == code


def test_a_representment_still_wrong_gets_the_reason_again(home: Home) -> None:
    still = line(trip(card(HOME, "plain"), "m-1", Entitlement.SENIOR_60))
    checker = home.checker(previous=lambda op, tid: ("ENTITLEMENT_MISMATCH", 1), representment=True)
    assert checker.check(still) == ("ENTITLEMENT_MISMATCH", 0)


def test_every_rejection_code_is_known_and_cap_exceeded_is_not_one() -> None:
    assert CAP_EXCEEDED not in REJECTIONS and OK not in REJECTIONS
    assert "DUPLICATE" in REJECTIONS and "NOT_DISPUTED" in REJECTIONS


# ---------------------------------------------------------------- caps


def test_a_ride_over_the_monthly_cap_keeps_its_fare_and_loses_its_concession_claim(
    home: Home,
) -> None:
    checker = home.checker(table_of(CAPPED_FARES))
    minute = timedelta(minutes=1)
    codes = [checker.check(senior_free(f"t-{i}", at=AT + i * minute)) for i in range(3)]
    assert codes == [(OK, 200), (OK, 200), (CAP_EXCEEDED, 0)]  # free: nothing was charged
    half = line(trip(card(HOME, "senior"), "h-1", Entitlement.SENIOR_60))
    again = line(trip(card(HOME, "senior"), "h-2", Entitlement.SENIOR_60, at=AT + minute))
    assert checker.check(half) == (OK, 150)
    assert checker.check(again) == (CAP_EXCEEDED, 100)  # the charged fare is still owed


def test_caps_count_every_district_and_every_card_of_the_holder(home: Home) -> None:
    caps = CapCounter(home.db)
    holder = home.registry.lookup(card(HOME, "senior").card_number)
    assert holder is not None
    # One free ride at home (HOME's own operator), counted when HOME synced its own trips.
    caps.count(f"{HOME}|bus-9|own-1", holder.holder_key, "senior-bus-free", DAY, AT.isoformat())
    checker = home.checker(table_of(CAPPED_FARES))
    # Another in THIRD, on the holder's reissued card.
    elsewhere = home.checker(table_of(CAPPED_FARES), sender=THIRD)
    assert elsewhere.check(senior_free("rc-1", "senior_reissued")) == (OK, 200)
    assert checker.check(senior_free("dz-1")) == (CAP_EXCEEDED, 0)
    sources = home.db.all("SELECT source FROM cap_usage ORDER BY source")
    assert sources == [(f"{THIRD}|transit-01|rc-1",), (f"{HOME}|bus-9|own-1",)]


def test_the_monthly_cap_starts_again_each_month_and_the_yearly_one_does_not(
    home: Home,
) -> None:
    holder = home.registry.lookup(card(HOME, "senior").card_number)
    assert holder is not None
    caps = CapCounter(home.db)
    for i, day in enumerate([date(2025, 12, 30), date(2026, 1, 5), date(2026, 2, 5)]):
        caps.count(f"x|o|{i}", holder.holder_key, "senior-bus-free", day, "")
    checker = home.checker(table_of(CAPPED_FARES))
    # March: no ride yet this month, but two of the year's three (December was last year).
    assert checker.check(senior_free("m-1")) == (OK, 200)
    assert checker.check(senior_free("m-2", at=AT + timedelta(minutes=1))) == (CAP_EXCEEDED, 0)


def test_only_accepted_concessions_count_against_a_cap(home: Home) -> None:
    checker = home.checker(table_of(CAPPED_FARES))
    wrong = line(trip(card(HOME, "senior"), "w-1", Entitlement.SENIOR_65), claimed=199)
    assert checker.check(wrong)[0] == "CLAIM_MISMATCH"
    assert checker.check(line(trip(card(HOME, "senior"), "f-1"))) == (OK, 200)  # full fare
    assert home.db.all("SELECT * FROM cap_usage") == []
    for i in range(4):  # a scheme with no cap in the rules is never capped
        t = trip(card(HOME, "student"), f"s-{i}", Entitlement.STUDENT, at=AT + timedelta(seconds=i))
        assert checker.check(line(t)) == (OK, 133)


def test_cap_usage_is_stored_once_per_source_and_read_back_by_a_new_counter(home: Home) -> None:
    caps = CapCounter(home.db)
    caps.count("a|b|1", "h", "s", DAY, "")
    caps.count("a|b|1", "h", "s", DAY, "")  # the same trip again: counted once
    assert caps.used("h", "s", "2026-03", "month") == 1
    fresh = CapCounter(home.db)
    assert fresh.used("h", "s", "2026", "year") == 1
    assert fresh.used("h", "other", "2026", "year") == 0
    assert not fresh.allows("h", "s", DAY, 1, None)
    assert fresh.allows("h", "s", DAY, 2, 2)
    assert not fresh.allows("h", "s", DAY, None, 1)
    assert fresh.allows("h", "s", DAY, None, None)  # a scheme without limits


def test_a_line_priced_by_a_table_no_longer_in_force_is_refused(home: Home) -> None:
    """A newer table took effect before the trip: the older, cheaper one does not pay."""
    ref = card(HOME, "senior")
    older = replace(table_of(), effective_from=DAY - timedelta(days=7))
    newer = replace(older, version="sample-2", effective_from=DAY)
    checker = home.checker(older, newer=newer)
    assert checker.check(line(trip(ref, "t-1"))) == ("UNPUBLISHED_FARES", 0)
    # Without the newer table, the same line is accepted: the refusal is the newer one's doing.
    assert home.checker(older).check(line(trip(ref, "t-2"))) == (OK, 200)


# ---------------------------------------------------------------- the answer the gate was given


def ttl_card(home: Home, name: str, *, student: bool = False) -> CardRef:
    """A card of HOME's registry since ISSUED, with HOME advertising a TTL of 120 s since then."""
    number = f"C512021{name}"
    born, until = date(2008, 6, 1), date(2030, 1, 1)
    home.registry.upsert(
        [CardRow(number, f"h-{name}", born, "active", False, student, until)], ISSUED
    )
    home.registry.record_advertised_ttl(120, ISSUED)
    return replace(card(HOME, "plain"), card_number=number)


def change(home: Home, ref: CardRef, changed: datetime, recorded: datetime, **fields: Any) -> None:
    stored = home.registry.lookup(ref.card_number)
    assert stored is not None
    new = replace(stored, changed_at=changed, recorded_at=recorded, **fields)
    home.registry.upsert([new], recorded)  # the back office feeds the registry at once


@pytest.mark.parametrize(
    ("lost_before", "code"),
    [
        (timedelta(seconds=60), OK),  # a gate may still have held an ACTIVE answer
        (timedelta(seconds=119), OK),
        (timedelta(seconds=121), "CARD_NOT_ACTIVE"),
        (timedelta(seconds=200), "CARD_NOT_ACTIVE"),  # every cached answer had run out
    ],
)
def test_a_card_lost_within_the_advertised_ttl_before_the_trip_is_the_homes_risk(
    home: Home, lost_before: timedelta, code: str
) -> None:
    ref = ttl_card(home, "LOST01")
    change(home, ref, AT - lost_before, AT - lost_before, status="lost")
    assert home.checker().check(line(trip(ref, "t-1"))) == (code, 200 if code == OK else 0)


def test_a_loss_recorded_after_the_trip_does_not_count_from_when_it_was_reported(
    home: Home,
) -> None:
    """The home's data-entry delay is not moved onto the operator that let the card through."""
    ref = ttl_card(home, "LATE01")
    change(home, ref, AT - timedelta(days=1), AT + timedelta(hours=1), status="lost")
    assert home.checker().check(line(trip(ref, "t-1"))) == (OK, 200)
    later = AT + timedelta(hours=1, seconds=200)  # the loss known for longer than the TTL
    assert home.checker().check(line(trip(ref, "t-2", at=later))) == ("CARD_NOT_ACTIVE", 0)


@pytest.mark.parametrize(
    ("removed_before", "code"),
    [
        (timedelta(days=30), "ENTITLEMENT_MISMATCH"),
        (timedelta(seconds=200), "ENTITLEMENT_MISMATCH"),
        (timedelta(seconds=60), OK),  # a cached answer still said STUDENT
    ],
)
def test_a_concession_counts_if_a_cached_answer_may_still_have_granted_it(
    home: Home, removed_before: timedelta, code: str
) -> None:
    ref = ttl_card(home, "STUD01", student=True)
    change(home, ref, AT - removed_before, AT - removed_before, student=False)
    student = trip(ref, "t-1", Entitlement.STUDENT)
    assert home.checker().check(line(student)) == (code, 133 if code == OK else 0)
    assert home.checker().check(line(trip(ref, "t-2"))) == (OK, 200)  # full fare: still fine


def test_a_flag_granted_only_after_the_trip_is_not_a_concession_then(home: Home) -> None:
    ref = ttl_card(home, "STUD02")
    change(home, ref, AT - timedelta(days=2), AT + timedelta(minutes=1), student=True)
    student = trip(ref, "t-1", Entitlement.STUDENT)
    assert home.checker().check(line(student)) == ("ENTITLEMENT_MISMATCH", 0)


def test_a_ttl_advertised_after_the_trip_does_not_rejudge_it(home: Home) -> None:
    near = ttl_card(home, "NEAR01")  # lost 60 s before the trip: accepted under 120 s
    change(home, near, AT - timedelta(seconds=60), AT - timedelta(seconds=60), status="lost")
    far = ttl_card(home, "FAR001")  # lost 200 s before: refused under 120 s
    change(home, far, AT - timedelta(seconds=200), AT - timedelta(seconds=200), status="lost")
    for ttl in (10, 600):
        assert home.registry.record_advertised_ttl(ttl, AT + timedelta(hours=2))
        assert home.checker().check(line(trip(near, f"n-{ttl}"))) == (OK, 200)
        assert home.checker().check(line(trip(far, f"f-{ttl}"))) == ("CARD_NOT_ACTIVE", 0)
    # A trip well after the change is judged by the TTL of 600 s.
    after = AT + timedelta(hours=3)
    found, lost = after - timedelta(seconds=300), after - timedelta(seconds=200)
    change(home, far, found, found, status="active")
    change(home, far, lost, lost, status="lost")
    assert home.checker().check(line(trip(far, "f-after", at=after))) == (OK, 200)


# ---------------------------------------------------------------- a representment is the same trip


def first_presentment() -> Line:
    """HOME's plain card-holder at gate-3, priced for an entitlement the holder lacks."""
    t = trip(card(HOME, "plain"), "m-1", Entitlement.SENIOR_65)
    return line(replace(t, gate_id="gate-3"))


def representing(home: Home, first: Line) -> LineChecker:
    """A checker of a representment, the first presentment rejected and its digest kept."""
    checker = home.checker(previous=lambda op, tid: ("ENTITLEMENT_MISMATCH", 1), representment=True)
    checker.presented = lambda op, tid: (
        first.trip.presentment_digest(),
        correctable_values(first.trip),
    )
    return checker


@pytest.mark.parametrize(
    "changes",
    [
        {"card": card(HOME, "senior")},
        {"place_id": "route-9"},
        {"occurred_at": AT + timedelta(seconds=1)},
        {"gate_id": "gate-4"},
        {"gate_id": ""},
        {"scene": Scene.SCENIC_AREA},
    ],
)
def test_a_representment_of_another_trip_is_not_the_same_trip(
    home: Home, changes: dict[str, Any]
) -> None:
    first = first_presentment()
    fixed = replace(first.trip, applied_entitlement=None, charged_fen=200, concession_fen=0)
    other = line(replace(fixed, **changes))
    assert representing(home, first).check(other) == ("NOT_SAME_TRIP", 0)
    assert "NOT_SAME_TRIP" in REJECTIONS


def test_a_representment_correcting_the_price_is_the_same_trip(home: Home) -> None:
    first = first_presentment()
    fixed = replace(first.trip, applied_entitlement=None, charged_fen=200, concession_fen=0)
    assert representing(home, first).check(line(fixed)) == (OK, 200)


def test_a_representment_correcting_what_the_rejection_was_not_about_is_refused(
    home: Home,
) -> None:
    """Rejected for the entitlement: the fare version it was priced by is not in dispute."""
    first = first_presentment()
    fixed = replace(first.trip, applied_entitlement=None, charged_fen=200, concession_fen=0)
    repriced = line(replace(fixed, fare_version="sample-0"))
    assert representing(home, first).check(repriced) == ("BEYOND_DISPUTE", 0)
    assert "BEYOND_DISPUTE" in REJECTIONS
    lost = home.checker(previous=lambda op, tid: ("CARD_NOT_ACTIVE", 1), representment=True)
    lost.presented = lambda op, tid: (
        first.trip.presentment_digest(),
        correctable_values(first.trip),
    )
    assert lost.check(line(fixed)) == ("BEYOND_DISPUTE", 0)  # nothing of the trip was disputed


def test_without_a_stored_digest_a_representment_is_judged_as_before(home: Home) -> None:
    """Lines received by the previous release have no digest: nothing to compare."""
    first = first_presentment()
    moved = replace(
        first.trip,
        occurred_at=AT + timedelta(seconds=1),
        applied_entitlement=None,
        charged_fen=200,
        concession_fen=0,
    )
    checker = home.checker(previous=lambda op, tid: ("ENTITLEMENT_MISMATCH", 1), representment=True)
    assert checker.check(line(moved)) == (OK, 200)  # presented: None, the default


# ---------------------------------------------------------------- the gate's decision source


def offline(t: Trip) -> Trip:
    return replace(t, decision_source=DecisionSource.OFFLINE_POLICY)


@pytest.mark.parametrize(
    ("lost_before", "risk", "code"),
    [
        (None, "operator", OK),  # ACTIVE when it occurred: the standard fare is owed
        (timedelta(seconds=1), "operator", "CARD_NOT_ACTIVE"),  # no answer honoured, no TTL
        (timedelta(seconds=-1), "operator", OK),  # lost just after the trip
        (timedelta(seconds=1), "home", OK),  # the home took the first-ride risk
        (timedelta(days=30), "home", OK),
    ],
)
def test_an_offline_line_is_judged_on_the_card_as_the_agreement_says(
    home: Home, lost_before: timedelta | None, risk: str, code: str
) -> None:
    """An answer the gate never had is not honoured: within the advertised TTL (120 s), a
    card lost a second before an offline trip is the operator's loss unless the home bears
    the offline risk; a cached or stale answer's trip is still judged by the TTL."""
    ref = ttl_card(home, "OFF01")
    if lost_before is not None:
        change(home, ref, AT - lost_before, AT - lost_before, status="lost")
    agreement = replace(AGREEMENT, offline_risk=risk)
    t = trip(ref, "t-1")
    assert home.checker(agreement=agreement).check(line(offline(t))) == (
        code,
        200 if code == OK else 0,
    )
    if lost_before == timedelta(seconds=1):  # the same trip from a cached answer: home's risk
        for source in (None, DecisionSource.CACHE, DecisionSource.STALE, DecisionSource.PEER):
            marked = replace(t, trip_id=f"t-{source}", decision_source=source)
            assert home.checker(agreement=agreement).check(line(marked)) == (OK, 200)


def test_an_offline_line_claims_no_entitlement(home: Home) -> None:
    t = offline(trip(card(HOME, "senior"), "t-1", Entitlement.SENIOR_65))
    assert home.checker().check(line(t)) == ("ENTITLEMENT_MISMATCH", 0)
    full = offline(trip(card(HOME, "senior"), "t-2"))  # the standard fare
    assert home.checker().check(line(full)) == (OK, 200)


def test_an_offline_line_of_a_card_never_issued_is_unknown_whoever_bears_the_risk(
    home: Home,
) -> None:
    ghost = replace(card(HOME, "plain"), card_number="C5120219999999")
    agreement = replace(AGREEMENT, offline_risk="home")
    assert home.checker(agreement=agreement).check(line(offline(trip(ghost, "t-1")))) == (
        "UNKNOWN_CARD",
        0,
    )


def test_an_offline_line_without_fares_collected_through_home_claims_nothing(
    home: Home,
) -> None:
    terms = Agreement(SERVING, collect_through_home=False)
    t = offline(trip(card(HOME, "plain"), "t-1"))
    assert home.checker(agreement=terms).check(line(t, claimed=0)) == (OK, 0)
    assert home.checker(agreement=terms).check(line(replace(t, trip_id="t-2"))) == (
        "CLAIM_MISMATCH",
        0,
    )
