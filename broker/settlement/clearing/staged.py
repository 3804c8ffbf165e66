"""A big batch committed in parts while it is verified, and unmade unless it is acknowledged.

On SQLite, one transaction over a batch of millions of lines grows the
write-ahead log to gigabytes: every page the verifier reads back is looked up
through all of it, so each line costs more than the one before, and the
commit syncs it all at once. So the home commits a close batch's lines every
:data:`PART_LINES` lines (:class:`broker.settlement.clearing.receiver.Receiver`),
and the log is copied into the file behind it.

Nothing of the batch is published before its signed trailer checks out: its
acknowledgement (``in_batches``, which positions, reports and a resent batch
read) is written only in the last part's transaction. Until then the batch is
marked in ``in_pending``; its committed lines (``in_lines``, their first
presentments and cap uses, the verdict chunks) are unmade by :func:`unmake` when
the batch is not acknowledged (its trailer fails, the stream breaks off), and by
the next verification when the verifier died meanwhile. Verifications of one
home run one at a time (one verifier process per node; a SQLite file has one
node), so no other batch is checked against lines that may be unmade.

PostgreSQL keeps one transaction per batch (its replicas serialize cap counting
with a lock held for the whole transaction), and so does a representment (one
line, which may overwrite the first presentment's).
"""

from __future__ import annotations

from broker.core.db import Db

PART_LINES = 100_000  # lines per committed part of a close batch, on SQLite


def in_parts(db: Db, kind: str) -> bool:
    """Whether a batch of ``kind`` is committed in parts on ``db``."""
    return db.dialect == "sqlite" and kind == "close"


def mark(db: Db, sender: str, period: str, seq: int, now: str) -> None:
    """Batch ``sender``/``period``/``seq`` is being verified (in the first part's transaction)."""
    db.execute(
        "INSERT INTO in_pending (sender, period, seq, started_at) VALUES (?, ?, ?, ?)",
        (sender, period, seq, now),
    )


def done(db: Db, sender: str, period: str, seq: int) -> None:
    """The batch is acknowledged (in the last part's transaction, beside its ``in_batches``)."""
    db.execute(
        "DELETE FROM in_pending WHERE sender = ? AND period = ? AND seq = ?",
        (sender, period, seq),
    )


def unmake(db: Db) -> int:
    """Remove every committed part of every batch still pending (inside a write); the number
    of batches unmade.

    A pending close batch's stored lines are all new ones (a line received before is a
    duplicate, never stored), and each first presentment and cap use belongs to one of
    them: all of them go, and the mark with them.
    """
    pending = db.all("SELECT sender, period, seq FROM in_pending")
    for sender, period, seq in pending:
        batch = (sender, period, seq)
        lines = "SELECT {} FROM in_lines WHERE sender = ? AND period = ? AND seq = ?"
        db.execute(
            "DELETE FROM cap_usage WHERE source IN ("
            + lines.format("sender || '|' || operator_id || '|' || trip_id")
            + ")",
            batch,
        )
        db.execute(
            "DELETE FROM in_line_presentments WHERE sender = ? AND (operator_id, trip_id) IN ("
            + lines.format("operator_id, trip_id")
            + ")",
            (sender, *batch),
        )
        db.execute("DELETE FROM in_lines WHERE sender = ? AND period = ? AND seq = ?", batch)
        db.execute("DELETE FROM in_ack_chunks WHERE sender = ? AND period = ? AND seq = ?", batch)
        done(db, *batch)
    return len(pending)
