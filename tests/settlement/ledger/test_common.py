"""What both ledger stores decide the same way (broker.settlement.ledger.common).

The pure helpers (``resubmitted``, ``TRIP_COLUMNS``, ``trip_from_row``) are tested
directly; the behaviour both stores share is tested through ``ledger_factory``,
so every test taking it runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.cards.model import CardRef, DecisionSource, Entitlement, Scene
from broker.core.db import Db
from broker.settlement.ledger import Ledger, open_ledger
from broker.settlement.ledger.common import (
    CONFLICT,
    TRIP_COLUMNS,
    gate_and_source,
    resubmitted,
    tap_spans,
    trip_from_row,
)
from broker.settlement.trips import ACCEPT, Judgement, Outcome, Reason, Trip

NOW = datetime(2026, 11, 28, 8, 0, tzinfo=UTC)
BAD_AMOUNTS = Judgement(
    Outcome.REJECTED, Reason.BAD_AMOUNTS, "charged + concession must equal gross"
)


def trip(n: int = 1, **changes: object) -> Trip:
    """An accepted-looking trip ``t-00000n`` of operator bus-01, five minutes before NOW."""
    base = Trip(
        "bus-01",
        f"t-{n:06d}",
        CardRef("512021", "C5120210000001"),
        Scene.BUS,
        "",
        NOW - timedelta(minutes=5),
        200,
        0,
        200,
        Entitlement.SENIOR_65,
        "sample-1",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def stored(t: Trip, verdict: Judgement) -> tuple[str, str, str, str]:
    """A ledger row's ``(digest, outcome, reason, detail)`` for ``t`` stored with ``verdict``."""
    return (t.digest(), verdict.outcome.value, verdict.reason.value, verdict.detail)


# ---------------------------------------------------------------- resubmitted


def test_resubmitting_the_same_content_answers_the_stored_outcome():
    t = trip()
    assert resubmitted(stored(t, ACCEPT), t) == ACCEPT


def test_a_stored_rejection_is_answered_again_not_judged_again():
    """Idempotence covers rejections too: the stored reason and detail come back as enums."""
    t = trip(charged_fen=10)
    again = resubmitted(stored(t, BAD_AMOUNTS), t)
    assert again == BAD_AMOUNTS
    assert again.outcome is Outcome.REJECTED and again.reason is Reason.BAD_AMOUNTS


def test_other_content_under_a_stored_id_is_a_conflict():
    t = trip()
    for change in ({"place_id": "route-9"}, {"charged_fen": 1}, {"card": CardRef("512021", "X1")}):
        verdict = resubmitted(stored(t, ACCEPT), replace(t, **change))
        assert verdict == CONFLICT
        assert verdict.outcome is Outcome.CONFLICT
        assert verdict.reason is Reason.DUPLICATE_CONTENT_DIFFERS


def test_the_same_instant_in_another_time_zone_is_other_content():
    """The digest hashes occurred_at's isoformat: a resubmission must send the same text."""
    t = trip()
    shifted = replace(t, occurred_at=t.occurred_at.astimezone(timezone(timedelta(hours=8))))
    assert shifted.occurred_at == t.occurred_at
    assert resubmitted(stored(t, ACCEPT), shifted) == CONFLICT


# ---------------------------------------------------------------- TRIP_COLUMNS / trip_from_row


def column_names(columns: str) -> list[str]:
    """The name of each column of a select list: a column's own, or an expression's alias."""
    names, depth, current = [], 0, ""
    for ch in columns + ",":
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            names.append(current.strip().rsplit(" AS ", 1)[-1])
            current = ""
        else:
            current += ch
    return names


def test_trip_columns_follow_the_trip_fields_in_order():
    """trip_from_row reads by position: the columns must list Trip's fields, card split in two."""
    columns = column_names(TRIP_COLUMNS)
    fields = [f.name for f in dataclasses.fields(Trip)]
    card = fields.index("card")
    assert fields[-2:] == ["gate_id", "decision_source"]  # both read in one lookup, last
    assert columns == [
        *fields[:card],
        "issuer_region",
        "card_number",
        *fields[card + 1 : -2],
        "gate_and_source",
    ]


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (None, ("", 0)),
        ("gate-3|0", ("gate-3", 0)),
        ("|4", ("", 4)),
        ("a|b|5", ("a|b", 5)),  # a gate id may hold "|": the source is after the last one
        ("gate|with|pipes|0", ("gate|with|pipes", 0)),
    ],
)
def test_a_gate_and_source_splits_at_the_last_bar(stored, expected):
    assert gate_and_source(stored) == expected


def test_a_row_as_sqlite_returns_it_comes_back_as_the_trip():
    t = trip()
    row = (
        "bus-01",
        "t-000001",
        "512021",
        "C5120210000001",
        1,
        "",
        "2026-11-28T07:55:00.000000+00:00",
        200,
        0,
        200,
        2,
        "sample-1",
        None,  # no trip_gates row: neither a gate nor a source was sent
    )
    back = trip_from_row(row)
    assert back == t and back.digest() == t.digest()
    assert back.scene is Scene.BUS and back.applied_entitlement is Entitlement.SENIOR_65


def test_a_row_with_an_aware_datetime_comes_back_in_utc():
    """PostgreSQL hands back timestamptz in the session's zone; the trip is always in UTC."""
    t = trip()
    local = t.occurred_at.astimezone(timezone(timedelta(hours=8)))
    row = ("bus-01", "t-000001", "512021", "C5120210000001", 1, "", local)
    back = trip_from_row((*row, 200, 0, 200, 2, "sample-1", None))
    assert back.occurred_at.utcoffset() == timedelta(0)
    assert back.digest() == t.digest()  # so that a resubmission still matches


def test_a_row_without_entitlement_comes_back_with_none_and_enums():
    row = ("op", "t", "512021", "C5120210000001", 3, "hall", "2026-11-28T00:00:00+08:00")
    back = trip_from_row((*row, 0, 0, 0, 0, "v1", "gate-7|5"))
    assert back.applied_entitlement is None  # 0 is "no entitlement applied"
    assert back.decision_source is DecisionSource.OFFLINE_POLICY
    assert back.scene is Scene.MUSEUM
    assert back.occurred_at == datetime(2026, 11, 27, 16, 0, tzinfo=UTC)
    assert (back.gross_fare_fen, back.charged_fen, back.concession_fen) == (0, 0, 0)
    assert back.gate_id == "gate-7"


# ---------------------------------------------------------------- both stores (ledger_factory)


def test_recording_is_idempotent_and_a_changed_resubmission_is_a_conflict(ledger_factory):
    ledger = ledger_factory()
    good, bad = trip(1), trip(2, charged_fen=10)
    judged = [(good, ACCEPT), (bad, BAD_AMOUNTS)]
    first = ledger.record(judged, NOW)
    assert first == [ACCEPT, BAD_AMOUNTS]
    again = ledger.record(judged, NOW + timedelta(seconds=1))
    assert again == first and ledger.count() == 2  # nothing stored twice
    changed = replace(good, place_id="route-9")
    conflict = ledger.record([(changed, ACCEPT)], NOW)
    assert conflict == [CONFLICT]
    assert ledger.outcome("bus-01", good.trip_id) == first[0]  # the stored trip is untouched
    ledger.close()
    reopened = ledger_factory()  # committed before acknowledged
    assert reopened.count() == 2 and reopened.outcome("bus-01", bad.trip_id) == first[1]
    reopened.close()


def test_a_resubmission_answers_the_stored_verdict_not_the_new_one(ledger_factory):
    """A trip re-judged later (say, now too late) keeps the outcome it was stored with."""
    ledger = ledger_factory()
    t = trip()
    ledger.record([(t, ACCEPT)], NOW)
    late = Judgement(Outcome.REJECTED, Reason.TOO_LATE, "occurred more than 72 h ago")
    assert ledger.record([(t, late)], NOW + timedelta(days=5)) == [ACCEPT]
    assert ledger.outcome("bus-01", t.trip_id) == ACCEPT
    ledger.close()


def test_a_batch_mixing_new_known_and_conflicting_ids_answers_each(ledger_factory):
    ledger = ledger_factory()
    a, b = trip(1), trip(2)
    ledger.record([(a, ACCEPT), (b, ACCEPT)], NOW)
    changed_b, c = replace(b, place_id="route-9"), trip(3, charged_fen=10)
    got = ledger.record([(changed_b, ACCEPT), (c, BAD_AMOUNTS), (a, ACCEPT)], NOW)
    assert got == [CONFLICT, BAD_AMOUNTS, ACCEPT]
    assert ledger.count() == 3  # only the new one was added
    assert ledger.outcome("bus-01", c.trip_id) == BAD_AMOUNTS
    ledger.close()


def test_the_same_trip_id_of_two_operators_is_two_trips(ledger_factory):
    ledger = ledger_factory()
    mine, theirs = trip(1), trip(1, operator_id="museum-01", place_id="hall")
    assert ledger.record([(mine, ACCEPT), (theirs, BAD_AMOUNTS)], NOW) == [ACCEPT, BAD_AMOUNTS]
    assert ledger.count() == 2
    assert ledger.outcome("bus-01", "t-000001") == ACCEPT
    assert ledger.outcome("museum-01", "t-000001") == BAD_AMOUNTS
    ledger.close()


def test_an_empty_batch_stores_nothing_and_answers_nothing(ledger_factory):
    ledger = ledger_factory()
    assert ledger.record([], NOW) == []
    assert ledger.count() == 0
    ledger.record([(trip(1), ACCEPT)], NOW)
    assert ledger.record([], NOW) == [] and ledger.count() == 1
    ledger.close()


def test_an_unknown_trip_has_no_outcome(ledger_factory):
    ledger = ledger_factory()
    ledger.record([(trip(1), ACCEPT)], NOW)
    assert ledger.outcome("bus-01", "t-000002") is None
    assert ledger.outcome("museum-01", "t-000001") is None
    ledger.close()


def test_accepted_trips_of_a_day_come_back_whole(ledger_factory):
    ledger = ledger_factory()
    late = datetime(2026, 11, 27, 15, 59, 59, 999000, tzinfo=UTC)  # 27th in Shanghai
    trips = [
        trip(1, occurred_at=late),
        trip(2),
        trip(3, operator_id="museum-01", scene=Scene.MUSEUM, applied_entitlement=None),
        trip(4, charged_fen=10),
    ]
    verdicts = [ACCEPT, ACCEPT, ACCEPT, BAD_AMOUNTS]  # the last is rejected
    ledger.record(list(zip(trips, verdicts, strict=True)), NOW)
    day = ledger.accepted_trips(date(2026, 11, 28))
    assert [t.trip_id for t in day] == ["t-000002", "t-000003"]
    assert ledger.accepted_trips(date(2026, 11, 28), "museum-01") == [trips[2]]
    assert ledger.accepted_trips(date(2026, 11, 27)) == [trips[0]]  # every field round-trips
    assert ledger.accepted_trips(date(2026, 11, 29)) == []
    ledger.close()


def test_accepted_trips_come_in_time_order(ledger_factory):
    ledger = ledger_factory()
    trips = [trip(n, occurred_at=NOW - timedelta(minutes=n)) for n in (1, 3, 2)]
    ledger.record([(t, ACCEPT) for t in trips], NOW)
    got = ledger.accepted_trips(date(2026, 11, 28))
    assert [t.trip_id for t in got] == ["t-000003", "t-000002", "t-000001"]
    ledger.close()


# ---------------------------------------------------------------- gate ids and duplicate taps


@pytest.fixture(params=["sqlite", "postgres"])
def windowed(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[timedelta], Ledger]]:
    """Opens the ledger under test with a duplicate window, on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield lambda window: open_ledger(tmp_path / "ledger.sqlite3", None, "x", window)
        return
    url = request.getfixturevalue("postgres_url")
    schema = f"yk_test_{secrets.token_hex(4)}"
    yield lambda window: open_ledger(None, url, schema, window)
    raw = Db.postgres(url, schema)
    raw.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    raw.close()


def tap(n: int, seconds: float = 0, gate: str = "gate-3", **changes: object) -> Trip:
    """Trip ``n`` at gate-3 of route-9, ``seconds`` after the first tap (five minutes ago)."""
    at = NOW - timedelta(minutes=5) + timedelta(seconds=seconds)
    return trip(n, **{"gate_id": gate, "place_id": "route-9", "occurred_at": at, **changes})


def test_a_gate_id_is_stored_and_read_back_and_without_one_reads_back_empty(ledger_factory):
    ledger = ledger_factory()
    ledger.record([(tap(1), ACCEPT), (trip(2), ACCEPT)], NOW)
    assert {(t.trip_id, t.gate_id) for t in ledger.accepted_trips(date(2026, 11, 28))} == {
        ("t-000001", "gate-3"),
        ("t-000002", ""),
    }
    assert ledger.record([(tap(1), ACCEPT)], NOW) == [ACCEPT]  # the same trip, gate and all
    assert ledger.record([(tap(1, gate="gate-4"), ACCEPT)], NOW) == [CONFLICT]
    assert ledger.record([(replace(tap(1), gate_id=""), ACCEPT)], NOW) == [CONFLICT]
    ledger.close()


def test_a_decision_source_is_stored_and_read_back_with_or_without_a_gate(ledger_factory):
    """The source lives beside the gate (ledger migration 4); the digest counts it, so the
    same trip id with another source is a conflict, and the same one its stored outcome."""
    ledger = ledger_factory()
    offline = tap(1, decision_source=DecisionSource.OFFLINE_POLICY)
    stale = replace(trip(2), decision_source=DecisionSource.STALE)  # a source, no gate
    plain = trip(3)  # neither: the previous release's trip
    assert ledger.record([(t, ACCEPT) for t in (offline, stale, plain)], NOW) == [ACCEPT] * 3
    back = {t.trip_id: t for t in ledger.accepted_trips(date(2026, 11, 28))}
    assert back["t-000001"] == offline and back["t-000002"] == stale
    assert back["t-000003"] == plain and back["t-000003"].decision_source is None
    assert ledger.record([(offline, ACCEPT), (stale, ACCEPT)], NOW) == [ACCEPT, ACCEPT]
    other = replace(offline, decision_source=DecisionSource.CACHE)
    assert ledger.record([(other, ACCEPT)], NOW) == [CONFLICT]
    assert ledger.record([(replace(stale, decision_source=None), ACCEPT)], NOW) == [CONFLICT]
    # A trip with a source and no gate is never taken for a tap at a gate "".
    again = replace(trip(4), decision_source=DecisionSource.STALE)
    assert ledger.record([(again, ACCEPT)], NOW) == [ACCEPT]
    ledger.close()


def test_the_same_tap_under_a_new_trip_id_is_a_suspected_duplicate_across_requests(
    windowed,
):
    ledger = windowed(timedelta(seconds=5))
    assert ledger.record([(tap(1), ACCEPT)], NOW) == [ACCEPT]
    [again] = ledger.record([(tap(2, seconds=3), ACCEPT)], NOW)
    assert (again.outcome, again.reason) == (Outcome.REJECTED, Reason.SUSPECTED_DUPLICATE)
    assert again.detail == "the same tap as trip t-000001 (3 s apart at this gate)"
    assert "C5120210000001" not in again.detail
    [earlier] = ledger.record([(tap(3, seconds=-5), ACCEPT)], NOW)  # the window's far edge
    assert earlier.reason is Reason.SUSPECTED_DUPLICATE
    # Each id keeps the outcome it was stored with, however often it is sent again.
    assert ledger.record([(tap(2, seconds=3), ACCEPT)], NOW) == [again]
    assert ledger.outcome("bus-01", "t-000002") == again
    assert ledger.record([(tap(1), ACCEPT)], NOW) == [ACCEPT]
    assert [t.trip_id for t in ledger.accepted_trips(date(2026, 11, 28))] == ["t-000001"]
    ledger.close()


def test_the_same_tap_twice_in_one_request_is_refused_the_second_time(windowed):
    ledger = windowed(timedelta(seconds=5))
    got = ledger.record(
        [(tap(1), ACCEPT), (tap(2, seconds=1), ACCEPT), (tap(1), ACCEPT), (tap(3, 9), ACCEPT)],
        NOW,
    )
    assert [(j.outcome, j.reason) for j in got] == [
        (Outcome.ACCEPTED, Reason.OK),
        (Outcome.REJECTED, Reason.SUSPECTED_DUPLICATE),
        (Outcome.ACCEPTED, Reason.OK),  # the same trip id again: a resubmission, not a tap
        (Outcome.ACCEPTED, Reason.OK),
    ]
    assert ledger.count() == 3
    ledger.close()


def test_other_taps_near_in_time_are_accepted(windowed):
    """Outside the window, another gate, place, card or operator, or no gate id: another tap."""
    ledger = windowed(timedelta(seconds=5))
    ledger.record([(tap(1), ACCEPT)], NOW)
    others = [
        tap(2, seconds=5.001),
        tap(3, seconds=-6),
        tap(4, gate="gate-4"),
        tap(5, place_id="route-10"),
        tap(6, card=CardRef("512021", "C5120210000002")),
        tap(7, operator_id="bus-02"),
    ]
    assert ledger.record([(t, ACCEPT) for t in others], NOW) == [ACCEPT] * len(others)
    ungated = [replace(tap(n), gate_id="") for n in (8, 9)]  # cannot be told from a second tap
    assert ledger.record([(t, ACCEPT) for t in ungated], NOW) == [ACCEPT, ACCEPT]
    ledger.close()


def test_a_rejected_tap_is_not_one_a_later_trip_duplicates(windowed):
    ledger = windowed(timedelta(seconds=5))
    ledger.record([(tap(1), BAD_AMOUNTS), (tap(2, seconds=1), ACCEPT)], NOW)
    assert ledger.outcome("bus-01", "t-000002") == ACCEPT
    ledger.close()


def test_a_stored_rejected_trip_sent_again_is_not_a_tap_a_new_trip_duplicates(windowed):
    """The operator re-uploads its file with the bad line and, under a new id, the corrected
    trip: the old id keeps its rejection, and is no tap the corrected trip repeats."""
    ledger = windowed(timedelta(seconds=5))
    assert ledger.record([(tap(1), BAD_AMOUNTS)], NOW) == [BAD_AMOUNTS]
    assert ledger.record([(tap(1), ACCEPT), (tap(2, seconds=1), ACCEPT)], NOW) == [
        BAD_AMOUNTS,
        ACCEPT,
    ]
    assert ledger.outcome("bus-01", "t-000002") == ACCEPT
    ledger.close()


def test_a_window_of_zero_turns_the_check_off(windowed):
    ledger = windowed(timedelta(0))
    assert ledger.record([(tap(1), ACCEPT), (tap(2), ACCEPT)], NOW) == [ACCEPT, ACCEPT]
    ledger.close()


WINDOW = timedelta(seconds=5)


def test_tap_spans_merge_a_cards_overlapping_windows_and_keep_cards_apart():
    def at(n: int, card: str = "C5120210000001", seconds: float = 0.0) -> Trip:
        return trip(n, card=CardRef("512021", card), occurred_at=NOW + timedelta(seconds=seconds))

    base = NOW
    spans = tap_spans(
        [at(1), at(2, seconds=3), at(3, seconds=10), at(4, seconds=30), at(5, "C5120210000002")],
        WINDOW,
    )
    s5 = timedelta(seconds=5)
    assert spans == [
        ("C5120210000001", base - s5, base + timedelta(seconds=15)),  # 0, 3, 10: one range
        ("C5120210000001", base + timedelta(seconds=25), base + timedelta(seconds=35)),
        ("C5120210000002", base - s5, base + s5),
    ]
    same = tap_spans([at(n, seconds=0) for n in range(100)], WINDOW)
    assert same == [("C5120210000001", base - s5, base + s5)]  # a hundred gates at once: one


@given(
    st.lists(
        st.tuples(st.sampled_from(["C5120210000001", "C5120210000002"]), st.integers(0, 600)),
        max_size=40,
    ),
    st.integers(-700, 1300),
)
def test_tap_spans_hold_each_instant_near_a_trip_once_and_nothing_else(taps, probe):
    trips = [
        trip(n, card=CardRef("512021", c), occurred_at=NOW + timedelta(seconds=sec))
        for n, (c, sec) in enumerate(taps)
    ]
    spans = tap_spans(trips, WINDOW)
    moment = NOW + timedelta(seconds=probe / 2)
    for card in ("C5120210000001", "C5120210000002"):
        near = any(
            c == card and abs(NOW + timedelta(seconds=sec) - moment) <= WINDOW for c, sec in taps
        )
        holding = [s for s in spans if s[0] == card and s[1] <= moment <= s[2]]
        assert len(holding) == (1 if near else 0)
