"""What operators are owed once the home districts have answered: claims as accepted.

For each home district the operator's ``accepted_fen`` is its claim less
what the home district's acknowledgements took off (rejected lines, and the
concession part of lines over a cap), plus what corrected lines won back on
representment. Before the day's batches are acknowledged it is zero.
"""

from __future__ import annotations

from datetime import date

from broker.fares.rules import FareSchedule
from broker.settlement.clearing.store import ClearingStore
from broker.settlement.config import SettlementSettings
from broker.settlement.ledger import Ledger
from broker.settlement.statements import StatementLine, statement


def with_acceptance(
    lines: list[StatementLine], store: ClearingStore, period: date, operator_id: str | None
) -> list[StatementLine]:
    """Fill ``accepted_fen`` and ``rejected_trips`` of statement lines from the stored acks."""
    day = period.isoformat()
    op_filter = " AND v.operator_id = ?" if operator_id else ""
    args: tuple[str, ...] = (day, operator_id) if operator_id else (day,)
    acked = {
        str(r[0])
        for r in store.db.all(
            "SELECT counterparty FROM out_batches WHERE period = ? AND kind = 'close' "
            "GROUP BY counterparty HAVING sum(CASE WHEN state = 'built' THEN 1 ELSE 0 END) = 0",
            (day,),
        )
    }
    cut = {
        str(r[0]): (int(r[1]), int(r[2]))
        for r in store.db.all(
            "SELECT v.counterparty, sum(v.claimed_fen - v.accepted_claim_fen), "
            "sum(CASE WHEN v.code = 'CAP_EXCEEDED' THEN 0 ELSE 1 END) "
            "FROM out_verdicts v JOIN out_batches b ON b.counterparty = v.counterparty "
            "AND b.period = v.period AND b.seq = v.seq AND b.kind = 'close' "
            f"WHERE v.period = ?{op_filter} GROUP BY v.counterparty",
            args,
        )
    }
    won = {
        str(r[0]): (int(r[1]), int(r[2]))
        for r in store.db.all(
            "SELECT v.counterparty, coalesce(sum(v.accepted_claim_fen), 0), count(*) "
            f"FROM disputes v WHERE v.period = ? AND v.state = 'accepted'{op_filter} "
            "GROUP BY v.counterparty",
            args,
        )
    }
    for line in lines:
        if line.home_district not in acked:
            continue
        reduction, rejected = cut.get(line.home_district, (0, 0))
        regained, recovered = won.get(line.home_district, (0, 0))
        line.accepted_fen = line.claimed_fen - reduction + regained
        line.rejected_trips = rejected - recovered
    return lines


def operator_statement(
    cfg: SettlementSettings,
    fares: FareSchedule | None,
    ledger: Ledger,
    store: ClearingStore,
    period: date,
    operator_id: str | None,
) -> list[StatementLine]:
    """A day's statement (one operator's or all), claims as the home districts accepted them."""
    lines = statement(
        ledger.accepted_trips(period, operator_id), cfg.district, cfg.agreement, fares
    )
    return with_acceptance(lines, store, period, operator_id)
