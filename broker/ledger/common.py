"""What both ledger stores decide the same way."""

from __future__ import annotations

from broker.trips import Judgement, Outcome, Reason, Trip

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
