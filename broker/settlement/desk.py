"""The work of trip intake, from a request's raw bytes to its answer's raw bytes.

A :class:`TripDesk` decodes a ``SubmitTripsRequest``, validates each trip
(:func:`broker.settlement.wire.trip_from_wire`), judges it
(:func:`broker.settlement.trips.judge`), records the batch in the ledger in one
transaction, committed before anything is answered, and encodes the
``SubmitTripsResponse``. It runs in the intake's worker process
(:mod:`broker.settlement.intake`), never under the node's interpreter lock:
everything here is plain, synchronous Python on one ledger connection.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from broker._proto.yikatong.v1 import settlement_pb2
from broker.core.errors import InvalidArgument
from broker.fares.rules import CHANGEOVER_GRACE, FareSchedule
from broker.settlement.clearing import crash
from broker.settlement.ledger import Ledger
from broker.settlement.trips import DEFAULT_LATE_WINDOW, Judge, Judgement, Trip
from broker.settlement.wire import results_to_wire, trips_from_wire

MAX_TRIPS_PER_REQUEST = 10_000
_REQUEST = settlement_pb2.SubmitTripsRequest
_REQUEST_TYPE = _REQUEST.DESCRIPTOR.full_name


def decode_request(body: bytes) -> settlement_pb2.SubmitTripsRequest:
    """A SubmitTrips body as its message; INVALID_ARGUMENT naming the request if it is not one
    (as :func:`broker.node.guard.decoder` answers for the methods the node decodes itself)."""
    try:
        return _REQUEST.FromString(body)
    except Exception:  # DecodeError, invalid UTF-8 in a string field, ...
        raise InvalidArgument("request", f"does not decode as {_REQUEST_TYPE}") from None


class TripDesk:
    """Judges and records trips for one district, on one ledger connection (not thread-safe)."""

    def __init__(
        self,
        ledger: Ledger,
        known_districts: frozenset[str],
        fares: FareSchedule | None,
        late_window: timedelta = DEFAULT_LATE_WINDOW,
        changeover_grace: timedelta = CHANGEOVER_GRACE,
    ) -> None:
        self.ledger = ledger
        self._known = known_districts
        self._fares = fares
        self._late = late_window
        self._grace = changeover_grace

    def submit(self, body: bytes, operator_id: str, now: datetime) -> bytes:
        """The serialized ``SubmitTripsResponse`` to a serialized ``SubmitTripsRequest`` sent by
        ``operator_id``, judged at ``now``; answered only once its trips are committed.

        A body that does not decode, or that holds more than
        :data:`MAX_TRIPS_PER_REQUEST` trips, is refused whole (:class:`InvalidArgument`).
        """
        crash.point("intake_started")  # test hook: a request taken, nothing decoded
        request = decode_request(body)
        wire = request.trips
        if len(wire) > MAX_TRIPS_PER_REQUEST:
            raise InvalidArgument("trips", f"at most {MAX_TRIPS_PER_REQUEST} per request")
        items = trips_from_wire(wire, operator_id)
        verdicts = self.record(items, now)
        crash.point("intake_recorded")  # test hook: committed, not answered
        return results_to_wire([t.trip_id for t in wire], verdicts)

    def record(self, items: Sequence[Trip | Judgement], now: datetime) -> list[Judgement]:
        """Judge and durably record ``items``; a ``Judgement`` (a malformed line) passes through.

        Returns one judgement per item, in order, once the batch is committed.
        """
        judge = Judge(now, self._known, self._fares, self._late, self._grace)
        judged = [(t, judge(t)) for t in items if isinstance(t, Trip)]
        if not judged:  # nothing to store: no transaction
            return [t for t in items if isinstance(t, Judgement)]
        stored = iter(self.ledger.record(judged, now))
        return [next(stored) if isinstance(t, Trip) else t for t in items]

    def outcomes(self, operator_id: str, trip_ids: Sequence[str]) -> bytes:
        """The serialized ``SubmitTripsResponse`` of ``operator_id``'s stored outcomes, in order
        (TRIP_OUTCOME_UNKNOWN for an id never stored)."""
        found = [self.ledger.outcome(operator_id, t) for t in trip_ids]
        return results_to_wire(list(trip_ids), found)

    def close(self) -> None:
        self.ledger.close()
