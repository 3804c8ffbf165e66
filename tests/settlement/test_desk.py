"""The work of trip intake (broker.settlement.desk): raw request in, committed, raw answer out.

Every test taking ``ledger_factory`` runs on a real ledger, SQLite and PostgreSQL.
The process around it (broker.settlement.intake) is tested in test_intake.py.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta

import pytest

from broker._proto.yikatong.v1 import settlement_pb2
from broker.cards.model import CardRef
from broker.core.errors import InvalidArgument
from broker.settlement.desk import MAX_TRIPS_PER_REQUEST, TripDesk, decode_request
from broker.settlement.ledger import Ledger, SqliteLedger
from broker.settlement.trips import ACCEPT, Judgement, Outcome, Reason, Trip
from broker.settlement.wire import trip_to_wire
from tests.settlement.ledger.test_common import NOW, trip  # one trip factory for both

KNOWN = frozenset({"500111", "512021"})
MALFORMED = Judgement(Outcome.REJECTED, Reason.MALFORMED, "trips[1].scene: must be one of ...")
OUT = settlement_pb2


def body(*trips: Trip | settlement_pb2.TripRecord) -> bytes:
    records = [t if isinstance(t, OUT.TripRecord) else trip_to_wire(t) for t in trips]
    return OUT.SubmitTripsRequest(trips=records).SerializeToString()


def answer(data: bytes) -> list[tuple[str, str, str]]:
    """(trip id, outcome, reason) of each result of a serialized SubmitTripsResponse."""
    got = OUT.SubmitTripsResponse.FromString(data).results
    return [(r.trip_id, OUT.TripOutcome.Name(r.outcome), r.reason) for r in got]


class Checked:
    """A ledger that, as ``record`` returns, asks a second connection what is committed."""

    def __init__(self, inner: Ledger, other: Ledger) -> None:
        self.inner = inner
        self.other = other
        self.seen_committed: list[int] = []

    def record(
        self, judged: list[tuple[Trip, Judgement]], received_at: datetime
    ) -> list[Judgement]:
        out = self.inner.record(judged, received_at)
        self.seen_committed.append(self.other.count())
        return out

    def outcome(self, operator_id: str, trip_id: str) -> Judgement | None:
        return self.inner.outcome(operator_id, trip_id)

    def accepted_trips(self, day: date, operator_id: str | None = None) -> list[Trip]:
        return self.inner.accepted_trips(day, operator_id)

    def count(self) -> int:
        return self.inner.count()

    def ping(self) -> bool:
        return self.inner.ping()

    def close(self) -> None:
        self.inner.close()
        self.other.close()


def desk_on(ledger: Ledger) -> TripDesk:
    return TripDesk(ledger, KNOWN, None)


def test_a_request_is_answered_only_once_its_trips_are_committed(ledger_factory):
    """When the ledger's record returns, another connection sees every trip: the answer
    is encoded after the commit, never before."""
    checked = Checked(ledger_factory(), ledger_factory())
    desk = desk_on(checked)
    got = answer(desk.submit(body(trip(1), trip(2, charged_fen=10)), "bus-01", NOW))
    assert got == [
        ("t-000001", "TRIP_OUTCOME_ACCEPTED", "ok"),
        ("t-000002", "TRIP_OUTCOME_REJECTED", "bad_amounts"),
    ]
    assert checked.seen_committed == [2]
    desk.close()


def test_a_batch_with_bad_trips_keeps_its_good_ones_in_order(ledger_factory):
    ledger = ledger_factory()
    desk = desk_on(ledger)
    items: list[Trip | Judgement] = [
        trip(1),
        MALFORMED,  # a line trip_from_wire refused: passes through, stored nowhere
        trip(2, card=CardRef("500118", "C5001180000001")),  # no agreement with 500118
        trip(3, occurred_at=NOW + timedelta(hours=1)),
        trip(4),
    ]
    got = desk.record(items, NOW)
    assert got[0] == ACCEPT and got[4] == ACCEPT
    assert got[1] is MALFORMED
    assert (got[2].reason, got[3].reason) == (Reason.UNKNOWN_DISTRICT, Reason.IN_FUTURE)
    assert ledger.count() == 4  # rejected trips are stored too, with their reason
    ids = ["t-000001", "t-000002", "t-000003", "t-000004"]
    stored = answer(desk.outcomes("bus-01", ids))
    assert [r[2] for r in stored] == ["ok", "unknown_district", "in_future", "ok"]
    desk.close()


def test_malformed_lines_and_other_operators_lines_are_refused_on_their_own(ledger_factory):
    desk = desk_on(ledger_factory())
    bad = trip_to_wire(trip(2))
    bad.scene = 99  # type: ignore[assignment]
    theirs = trip_to_wire(trip(3, operator_id="museum-01"))
    raw = desk.submit(body(trip(1), bad, theirs), "bus-01", NOW)
    got = OUT.SubmitTripsResponse.FromString(raw).results
    assert [(r.trip_id, r.reason) for r in got] == [
        ("t-000001", "ok"),
        ("t-000002", "malformed"),
        ("t-000003", "operator_mismatch"),
    ]
    assert got[1].detail.startswith("trips[1].scene:")
    assert desk.ledger.count() == 1
    desk.close()


def test_trips_are_judged_at_the_now_they_are_given(ledger_factory):
    desk = desk_on(ledger_factory())
    later = NOW + timedelta(hours=72, minutes=6)  # the trip occurred 72 h 11 min before
    assert answer(desk.submit(body(trip(1)), "bus-01", later))[0][2] == "too_late"
    desk.close()


def test_a_resubmission_answers_the_stored_outcome(ledger_factory):
    desk = desk_on(ledger_factory())
    request = body(trip(1), trip(2, charged_fen=10))
    first = desk.submit(request, "bus-01", NOW)
    # judged again five days later both would be too late: the stored outcomes answer
    again = desk.submit(request, "bus-01", NOW + timedelta(days=5))
    assert again == first
    assert desk.ledger.count() == 2
    desk.close()


def test_a_resubmission_with_other_content_is_a_conflict_and_changes_nothing(ledger_factory):
    desk = desk_on(ledger_factory())
    desk.submit(body(trip(1)), "bus-01", NOW)
    conflict = answer(desk.submit(body(trip(1, place_id="route-9")), "bus-01", NOW))
    assert conflict == [("t-000001", "TRIP_OUTCOME_CONFLICT", "duplicate_content_differs")]
    assert answer(desk.outcomes("bus-01", ["t-000001"]))[0][2] == "ok"
    desk.close()


def test_a_request_of_only_refused_lines_or_nothing_stores_nothing(ledger_factory):
    ledger = ledger_factory()
    desk = desk_on(ledger)
    assert answer(desk.submit(b"", "bus-01", NOW)) == []
    assert desk.record([MALFORMED, MALFORMED], NOW) == [MALFORMED, MALFORMED]
    assert ledger.count() == 0
    desk.close()


def test_outcomes_answer_in_order_with_unknown_for_ids_never_stored(ledger_factory):
    desk = desk_on(ledger_factory())
    desk.record([trip(1), trip(2, operator_id="museum-01")], NOW)
    got = answer(desk.outcomes("bus-01", ["t-000404", "t-000001", "t-000002"]))
    assert got == [
        ("t-000404", "TRIP_OUTCOME_UNKNOWN", "unknown"),
        ("t-000001", "TRIP_OUTCOME_ACCEPTED", "ok"),
        ("t-000002", "TRIP_OUTCOME_UNKNOWN", "unknown"),  # museum-01's, not bus-01's
    ]
    assert answer(desk.outcomes("bus-01", [])) == []
    desk.close()


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff", b"\x0a\x05abc", b"\x0a\x03\x12\x01\xff"])
def test_a_body_that_is_not_a_request_is_refused_naming_the_request(tmp_path, garbage):
    """Truncated, or a string field that is not UTF-8: refused whole, nothing stored."""
    desk = desk_on(SqliteLedger(tmp_path / "ledger.sqlite3"))
    with pytest.raises(InvalidArgument) as info:
        desk.submit(garbage, "bus-01", NOW)
    assert str(info.value) == "request: does not decode as yikatong.v1.SubmitTripsRequest"
    with pytest.raises(InvalidArgument):
        decode_request(garbage)
    assert desk.ledger.count() == 0
    desk.close()


def test_more_trips_than_a_request_may_hold_are_refused_whole(tmp_path):
    desk = desk_on(SqliteLedger(tmp_path / "ledger.sqlite3"))
    one = trip_to_wire(trip(1))
    huge = OUT.SubmitTripsRequest(trips=[one] * (MAX_TRIPS_PER_REQUEST + 1)).SerializeToString()
    with pytest.raises(InvalidArgument, match=r"^trips: at most 10000 per request$"):
        desk.submit(huge, "bus-01", NOW)
    assert desk.ledger.count() == 0
    desk.close()


def test_a_full_request_of_max_trips_is_recorded_in_one_transaction(tmp_path):
    """On SQLite only, to stay fast (a full request costs ~0.5 s per store)."""
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    desk = desk_on(ledger)
    trips = [trip(n) for n in range(MAX_TRIPS_PER_REQUEST)]
    trips[-1] = trip(MAX_TRIPS_PER_REQUEST - 1, charged_fen=10)  # the last one is bad
    got = answer(desk.submit(body(*trips), "bus-01", NOW))
    assert len(got) == MAX_TRIPS_PER_REQUEST
    assert all(r[2] == "ok" for r in got[:-1]) and got[-1][2] == "bad_amounts"
    assert ledger.count() == MAX_TRIPS_PER_REQUEST
    desk.close()
