"""What operators are owed: each part of a claim labelled by where it stands.

Per home district, an operator's claim is split by what has happened to it:

- ``not_batched_fen`` — trips accepted into the ledger after the last close
  (their claim under today's ``[[agreements]]``: nothing about them is stored yet);
- ``in_batch_fen`` — in a batch built and not yet acknowledged (the same);
- acknowledged — in a batch the home district acknowledged: the claim as
  *sent*, stored per operator with the acknowledgement, never recomputed, so
  a change of terms after the close does not move it; ``accepted_fen`` is
  what the home accepted of it (less rejected lines and the concession part
  of lines over a cap, plus what representments won back);
- ``disputed_fen`` — the claims of rejected lines still in dispute (open,
  represented, or finally rejected and not yet resolved);
- ``settled_fen`` — ``accepted_fen`` once the day is SETTLED with that home.

``claimed_fen`` is the sum of the acknowledged, in-batch and not-batched parts.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import date

from broker.fares.rules import FareSchedule
from broker.settlement.clearing.positions import position
from broker.settlement.clearing.store import ClearingStore
from broker.settlement.config import SettlementSettings
from broker.settlement.ledger.common import TRIP_COLUMNS, trip_from_row
from broker.settlement.statements import StatementLine, statement
from broker.settlement.trips import Trip


def _batches(store: ClearingStore, period: date) -> list[tuple[str, int, int, int, str]]:
    """The day's close batches: (home, seq, lo, hi, state)."""
    return [
        (str(r[0]), int(r[1]), int(r[2]), int(r[3]), str(r[4]))
        for r in store.db.all(
            "SELECT counterparty, seq, lo, hi, state FROM out_batches "
            "WHERE period = ? AND kind = 'close'",
            (period.isoformat(),),
        )
    ]


def _sent_claims(
    store: ClearingStore, period: date, operator_id: str | None
) -> tuple[dict[tuple[str, int], int], set[tuple[str, int]]]:
    """The operator's claim as sent per acknowledged close batch (home, seq), and the
    batches whose claims were stored at all (the previous release stored none)."""
    op = " AND o.operator_id = ?" if operator_id else ""
    args = (period.isoformat(), operator_id) if operator_id else (period.isoformat(),)
    close = (
        "FROM out_batch_operators o JOIN out_batches b ON b.counterparty = o.counterparty "
        "AND b.period = o.period AND b.seq = o.seq AND b.kind = 'close' WHERE o.period = ?"
    )
    stored = {
        (str(r[0]), int(r[1])): int(r[2])
        for r in store.db.all(
            f"SELECT o.counterparty, o.seq, sum(o.claimed_fen) {close}{op} "
            "GROUP BY o.counterparty, o.seq",
            args,
        )
    }
    recorded = {
        (str(r[0]), int(r[1]))
        for r in store.db.all(
            f"SELECT DISTINCT o.counterparty, o.seq {close}", (period.isoformat(),)
        )
    }
    return stored, recorded


def operator_statement(
    cfg: SettlementSettings,
    fares: FareSchedule | None,
    store: ClearingStore,
    period: date,
    operator_id: str | None,
) -> list[StatementLine]:
    """A day's statement (one operator's or all), each part of the claim labelled."""
    sql = (
        f"SELECT {TRIP_COLUMNS}, ingest_seq FROM trips WHERE settlement_day = ? "
        "AND outcome = 'accepted'"
    )
    args: list[object] = [store.trips.day(period)]
    if operator_id is not None:
        sql += " AND operator_id = ?"
        args.append(operator_id)
    batches = _batches(store, period)
    sent, recorded = _sent_claims(store, period, operator_id)
    parts: dict[str, dict[str, list[Trip]]] = defaultdict(lambda: defaultdict(list))
    for block in store.trips.stream(sql + " ORDER BY occurred_at, operator_id, trip_id", args):
        for row in block:
            trip, seq = trip_from_row(row[:-1]), int(row[-1])
            home = trip.card.issuer_region
            batch = next((b for b in batches if b[0] == home and b[2] < seq <= b[3]), None)
            if batch is None:
                part = "not_batched"
            elif batch[4] == "built":
                part = "in_batch"
            else:  # acknowledged: its claim as sent is stored, unless an old release sent it
                part = "acked" if (home, batch[1]) in recorded else "acked_unrecorded"
            parts[home][part].append(trip)
    everything = [t for by_part in parts.values() for ts in by_part.values() for t in ts]
    lines = statement(everything, cfg.district, cfg.agreement, fares)

    def claim(home: str, part: str) -> int:
        found = statement(parts[home][part], cfg.district, cfg.agreement, fares)
        return found[0].claimed_fen if found else 0

    for line in lines:
        home = line.home_district
        line.not_batched_fen = claim(home, "not_batched")
        line.in_batch_fen = claim(home, "in_batch")
        as_sent = sum(v for (h, _), v in sent.items() if h == home)
        acknowledged = as_sent + claim(home, "acked_unrecorded")
        line.claimed_fen = acknowledged + line.in_batch_fen + line.not_batched_fen
    return _accepted(lines, store, period, operator_id, batches)


def _accepted(
    lines: list[StatementLine],
    store: ClearingStore,
    period: date,
    operator_id: str | None,
    batches: list[tuple[str, int, int, int, str]],
) -> list[StatementLine]:
    """Fill what the homes accepted, what is in dispute and what is settled."""
    day = period.isoformat()
    op = " AND v.operator_id = ?" if operator_id else ""
    args: tuple[str, ...] = (day, operator_id) if operator_id else (day,)
    cut = {
        str(r[0]): (int(r[1]), int(r[2]))
        for r in store.db.all(
            "SELECT v.counterparty, sum(v.claimed_fen - v.accepted_claim_fen), "
            "sum(CASE WHEN v.code = 'CAP_EXCEEDED' THEN 0 ELSE 1 END) "
            "FROM out_verdicts v JOIN out_batches b ON b.counterparty = v.counterparty "
            "AND b.period = v.period AND b.seq = v.seq AND b.kind = 'close' "
            f"WHERE v.period = ?{op} GROUP BY v.counterparty",
            args,
        )
    }
    won = {
        str(r[0]): (int(r[1]), int(r[2]))
        for r in store.db.all(
            "SELECT v.counterparty, coalesce(sum(v.accepted_claim_fen), 0), count(*) "
            f"FROM disputes v WHERE v.period = ? AND v.state = 'accepted'{op} "
            "GROUP BY v.counterparty",
            args,
        )
    }
    disputed = {
        str(r[0]): int(r[1])
        for r in store.db.all(
            "SELECT v.counterparty, coalesce(sum(o.claimed_fen), 0) FROM disputes v "
            "JOIN out_verdicts o ON o.counterparty = v.counterparty AND o.period = v.period "
            "AND o.operator_id = v.operator_id AND o.trip_id = v.trip_id "
            "JOIN out_batches b ON b.counterparty = o.counterparty AND b.period = o.period "
            "AND b.seq = o.seq AND b.kind = 'close' "
            f"WHERE v.period = ? AND v.state IN ('open', 'represented', 'final'){op} "
            "GROUP BY v.counterparty",
            args,
        )
    }
    for line in lines:
        home = line.home_district
        acknowledged = line.claimed_fen - line.in_batch_fen - line.not_batched_fen
        if any(b[0] == home and b[4] != "built" for b in batches):
            reduction, rejected = cut.get(home, (0, 0))
            regained, recovered = won.get(home, (0, 0))
            line.accepted_fen = acknowledged - reduction + regained
            line.rejected_trips = rejected - recovered
        line.disputed_fen = disputed.get(home, 0)
        if position(store, home, period).state == "settled":
            line.settled_fen = line.accepted_fen
    return lines
