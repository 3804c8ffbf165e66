"""Storing a home district's acknowledgement: the batch acked, its verdicts, its disputes."""

from __future__ import annotations

from collections.abc import Mapping

from broker.core.db import Db
from broker.core.signing import Signed
from broker.settlement.clearing.batch import Spool, Totals, verdict_rows
from broker.settlement.clearing.store import b64
from broker.settlement.clearing.verify import CAP_EXCEEDED


def store_ack(
    db: Db,
    now: str,
    counterparty: str,
    day: str,
    seq: int,
    kind: str,
    totals: Totals,
    digest: str,
    ack: Signed,
    accepted: int,
    verdicts: Spool,
    by_operator: Mapping[str, tuple[int, int]] | None = None,
) -> None:
    """Record a home district's acknowledgement of batch ``seq``, in one transaction.

    The batch becomes ``acked`` with the signed acknowledgement; every verdict on
    a line is kept; a close's refused lines (other than over a cap) open disputes,
    and a representment's verdict settles the dispute it carried. ``by_operator``
    is the batch's (lines, claim) per operator as sent, kept for the statements.
    """
    with db.write():
        db.execute(
            "UPDATE out_batches SET state = 'acked', digest = ?, lines = ?, claimed_fen = ?, "
            "ack = ?, ack_key_id = ?, ack_signature = ?, accepted_claim_fen = ?, acked_at = ? "
            "WHERE counterparty = ? AND period = ? AND seq = ? AND state = 'built'",
            (
                digest,
                totals.lines,
                totals.claimed_fen,
                ack.document.decode(),
                ack.key_id,
                b64(ack.signature),
                accepted,
                now,
                counterparty,
                day,
                seq,
            ),
        )
        db.executemany(
            "INSERT INTO out_batch_operators (counterparty, period, seq, operator_id, lines, "
            "claimed_fen) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (counterparty, period, seq, operator_id) DO NOTHING",
            [
                (counterparty, day, seq, op, n, claimed)
                for op, (n, claimed) in sorted((by_operator or {}).items())
            ],
        )
        for chunk in verdicts.chunks():
            block = verdict_rows(chunk)  # (line_no, operator, trip, code, accepted, claimed)
            db.executemany(
                "INSERT INTO out_verdicts (counterparty, period, seq, line_no, operator_id, "
                "trip_id, code, claimed_fen, accepted_claim_fen) VALUES (?, ?, ?, ?, ?, ?, ?, ?, "
                "?) "
                "ON CONFLICT (counterparty, period, seq, line_no) DO NOTHING",
                [
                    (counterparty, day, seq, n, op, trip, code, claimed_fen, accepted_fen)
                    for n, op, trip, code, accepted_fen, claimed_fen in block
                ],
            )
            if kind == "close":
                db.executemany(
                    "INSERT INTO disputes (counterparty, period, operator_id, trip_id, code, "
                    "state, updated_at) VALUES (?, ?, ?, ?, ?, 'open', ?) "
                    "ON CONFLICT (counterparty, operator_id, trip_id) DO NOTHING",
                    [
                        (counterparty, day, op, trip, code, now)
                        for _, op, trip, code, _, _ in block
                        if code != CAP_EXCEEDED
                    ],
                )
        if kind == "represent":
            refused = {
                (op, trip): code
                for chunk in verdicts.chunks()
                for _, op, trip, code, _, _ in verdict_rows(chunk)
                if code != CAP_EXCEEDED
            }
            for op, trip in db.all(
                "SELECT operator_id, trip_id FROM disputes WHERE counterparty = ? AND "
                "period = ? AND represent_seq = ?",
                (counterparty, day, seq),
            ):
                code = refused.get((op, trip))
                # A representment carries one line: the batch's accepted claim is the line's.
                db.execute(
                    "UPDATE disputes SET state = ?, final_code = ?, accepted_claim_fen = ?, "
                    "updated_at = ? WHERE counterparty = ? AND operator_id = ? AND trip_id = ?",
                    (
                        "final" if code else "accepted",
                        code,
                        0 if code else accepted,
                        now,
                        counterparty,
                        op,
                        trip,
                    ),
                )
