"""``broker settle check``: proof that no accepted trip of a day is lost or counted twice.

For one settlement day, from this district's own stores (the place of travel's view):

- every accepted trip of a neighbour's card-holder is in exactly one close batch
  to that neighbour, or after the last close (not closed yet, listed apart) — but
  not once the day is sealed: then the next close owes it a batch;
- every batch holds exactly the trips of its range, and its stored figures are
  those of its lines;
- every acknowledged batch's signed acknowledgement (the home district's figures)
  names the batch as sent — its digest, line count and claim — and accepts no
  more than was claimed.

A crash at any point of a close, or a lost acknowledgement, leaves the day
checkable: the check only reads.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from broker.core.errors import DocumentRefused
from broker.core.signing import parse
from broker.settlement.clearing.store import ClearingStore
from broker.settlement.ledger.store import is_sealed


@dataclass
class DayCheck:
    """What :func:`check_day` found for one day."""

    period: str
    accepted: int = 0  # accepted trips of neighbours' card-holders
    in_batches: int = 0
    not_closed: int = 0  # after the last close: go in the next one
    batches: int = 0
    acknowledged: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems


def check_day(store: ClearingStore, own: str, period: date) -> DayCheck:
    """Check ``period`` (read only); :attr:`DayCheck.problems` lists what does not hold."""
    day = period.isoformat()
    out = DayCheck(day)
    trips = store.trips.all(
        "SELECT issuer_region, operator_id, trip_id, ingest_seq FROM trips "
        "WHERE settlement_day = ? AND outcome = 'accepted' AND issuer_region <> ?",
        (store.trips.day(period), own),
    )
    batches = store.db.all(
        "SELECT counterparty, seq, lo, hi, state, lines, digest, claimed_fen, ack, "
        "accepted_claim_fen FROM out_batches WHERE period = ? AND kind = 'close' "
        "ORDER BY counterparty, seq",
        (day,),
    )
    top = store.db.one("SELECT max(watermark) FROM day_closes WHERE period = ?", (day,))
    watermark = int(top[0]) if top and top[0] is not None else 0
    sealed = is_sealed(store.trips, period)  # then nothing may stay "not closed yet"
    out.accepted, out.batches = len(trips), len(batches)
    covered: Counter[tuple[str, str]] = Counter()
    per_batch: Counter[tuple[str, int]] = Counter()
    for home, operator, trip, seq in trips:
        holders = [
            (str(b[0]), int(b[1]))
            for b in batches
            if b[0] == home and int(b[2]) < int(seq) <= int(b[3])
        ]
        for holder in holders:
            per_batch[holder] += 1
        covered[(str(operator), str(trip))] = len(holders)
        if len(holders) > 1:
            out.problems.append(f"trip {operator}/{trip} is in {len(holders)} batches")
        elif holders:
            out.in_batches += 1
        elif int(seq) > watermark and not sealed:
            out.not_closed += 1
        elif int(seq) > watermark:
            out.problems.append(
                f"trip {operator}/{trip} (to {home}) is in no batch, and the day is sealed: "
                "run `broker settle close` for it"
            )
        else:
            out.problems.append(f"trip {operator}/{trip} (to {home}) is in no batch")
    for b in batches:
        _check_batch(out, b, per_batch[(str(b[0]), int(b[1]))])
    return out


def _check_batch(out: DayCheck, b: tuple[Any, ...], lines_in_range: int) -> None:
    home, seq, state = str(b[0]), int(b[1]), str(b[4])
    name = f"batch {home}/{out.period}/{seq}"
    if state != "acked":
        return  # built: not sent yet, or sent and its answer lost; the close sends it again
    out.acknowledged += 1
    lines, digest, claimed = b[5], b[6], b[7]
    if lines is None or int(lines) != lines_in_range:
        out.problems.append(f"{name} holds {lines} lines; its range holds {lines_in_range}")
    try:
        ack = parse(str(b[8] or ""), "batch-acknowledgement")
        theirs = (ack.integer("lines"), ack.text("batch_digest"), ack.integer("claimed_fen"))
        accepted = ack.integer("accepted_claim_fen")
    except DocumentRefused as exc:
        out.problems.append(f"{name}: its stored acknowledgement does not read: {exc}")
        return
    if theirs != (lines, digest, claimed):
        out.problems.append(
            f"{name}: the home acknowledged {theirs[0]} lines / {theirs[2]} fen claimed, "
            f"the batch holds {lines} / {claimed}"
        )
    if accepted > int(claimed or 0) or accepted != int(b[9] or 0):
        out.problems.append(f"{name}: accepted {accepted} fen against {claimed} claimed")
