"""One received batch's lines, checked and written chunk by chunk, then acknowledged.

:class:`BatchCheck` runs inside the transaction of a verification
(:class:`broker.settlement.clearing.receiver.Receiver`): each chunk's lines are
decoded, checked (:class:`broker.settlement.clearing.verify.LineChecker`) and
written before the next chunk is read, so a duplicate later in the same batch
is seen, and nothing of the batch is held in memory but its running totals and
the verdicts not yet encoded. :meth:`BatchCheck.finish` compares the totals with
the signed header, signs the acknowledgement and writes it; the caller commits.
Whether the chunks come from a complete spool or as they arrive makes no
difference here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from broker.core.db import Db, utc_text
from broker.core.errors import DocumentRefused
from broker.core.signing import Purpose, Signed, Signer
from broker.settlement.clearing import crash
from broker.settlement.clearing.batch import (
    CHUNK_LINES,
    Digest,
    Totals,
    Verdict,
    decode_lines,
    encode_verdicts,
)
from broker.settlement.clearing.store import b64
from broker.settlement.clearing.verify import CAP_EXCEEDED, OK, LineChecker
from broker.settlement.trips import Trip

Previous = Callable[[str, str], tuple[str, int] | None]  # (operator, trip) → (code, attempt)

# Codes of lines that are not stored: the line already was, or is not this home's.
_NOT_STORED = frozenset({"DUPLICATE", "NOT_DISPUTED", "WRONG_DISTRICT"})


@dataclass(frozen=True)
class Ack:
    """What goes back to the sender: verdict chunks, then the signed acknowledgement."""

    chunks: list[bytes]
    signed: Signed


class BatchCheck:
    """The lines of batch ``sender``/``period``/``seq`` checked and written, chunk by chunk."""

    def __init__(
        self,
        db: Db,
        sender: str,
        period: date,
        seq: int,
        kind: str,
        checker: Callable[[Previous], LineChecker],
    ) -> None:
        self._db = db
        self._sender = sender
        self._period = period.isoformat()
        self._seq = seq
        self._kind = kind
        self._attempt = 2 if kind == "represent" else 1
        self.totals = Totals()
        self.counts = {"accepted": 0, "cap_exceeded": 0, "rejected": 0}
        self.accepted_claim = 0
        self._verdicts: list[Verdict] = []  # encoded into chunks as they fill
        self._chunks: list[bytes] = []
        self._pending: dict[tuple[str, str], tuple[str, int]] = {}  # this chunk's lines
        self._known: dict[tuple[str, str], tuple[str, int]] = {}  # stored before: per chunk
        self._line_no = 0
        self._checker = checker(self._previous_of)

    def _previous_of(self, operator_id: str, trip_id: str) -> tuple[str, int] | None:
        key = (operator_id, trip_id)
        return self._pending.get(key) or self._known.get(key)

    def add(self, chunk: bytes) -> None:
        """Check one chunk's lines and write them (a chunk that does not parse refuses it)."""
        lines = decode_lines(chunk)
        self._known = previous_lines(
            self._db, self._sender, [(x.trip.operator_id, x.trip.trip_id) for x in lines]
        )
        rows = []
        firsts = []  # first presentments: what a representment must match
        sender, period, seq, attempt = self._sender, self._period, self._seq, self._attempt
        totals, counts, check = self.totals, self.counts, self._checker.check
        for line in lines:
            totals.add(line)
            code, accepted = check(line)
            self.accepted_claim += accepted
            t = line.trip
            if code == OK:
                counts["accepted"] += 1
            else:
                counts["cap_exceeded" if code == CAP_EXCEEDED else "rejected"] += 1
                self._verdicts.append(
                    Verdict(
                        self._line_no, t.operator_id, t.trip_id, code, accepted, line.claimed_fen
                    )
                )
                if len(self._verdicts) == CHUNK_LINES:
                    self._chunks.append(encode_verdicts(self._verdicts))
                    self._verdicts = []
            if code not in _NOT_STORED:
                self._pending[(t.operator_id, t.trip_id)] = (code, attempt)
                rows.append(
                    (
                        sender,
                        t.operator_id,
                        t.trip_id,
                        period,
                        seq,
                        attempt,
                        code,
                        line.claimed_fen,
                        accepted,
                    )
                )
                if attempt == 1:
                    firsts.append(
                        (
                            sender,
                            t.operator_id,
                            t.trip_id,
                            presentment_digest(t),
                            correctable(t),
                        )
                    )
            self._line_no += 1
        # Written per chunk, so a duplicate later in the same batch is seen.
        self._write(rows, firsts)
        self._pending.clear()

    def _write(self, rows: list[tuple[Any, ...]], firsts: list[tuple[Any, ...]]) -> None:
        self._db.executemany(
            "INSERT INTO in_lines (sender, operator_id, trip_id, period, seq, attempt, "
            "code, claimed_fen, accepted_claim_fen) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (sender, operator_id, trip_id) DO UPDATE SET "
            "seq = excluded.seq, attempt = excluded.attempt, code = excluded.code, "
            "claimed_fen = excluded.claimed_fen, "
            "accepted_claim_fen = excluded.accepted_claim_fen",
            rows,
        )
        self._db.executemany(
            "INSERT INTO in_line_presentments (sender, operator_id, trip_id, digest, "
            "correctable) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (sender, operator_id, trip_id) DO NOTHING",
            firsts,
        )

    def finish(self, own: str, header: dict[str, Any], signer: Signer, now: datetime) -> Ack:
        """Check the totals against the signed header, sign the acknowledgement and write it
        (inside the caller's transaction, which commits it)."""
        totals = self.totals
        stated = {k: header.get(k) for k in totals.as_doc()}
        if stated != totals.as_doc():
            raise DocumentRefused("batch totals do not match its lines")
        chunks = self._chunks
        if self._verdicts:
            chunks.append(encode_verdicts(self._verdicts))
            self._verdicts = []
        vdigest = Digest()
        for c in chunks:
            vdigest.update(c)
        ack = signer.sign(
            {
                "type": "ack",
                "from": own,
                "to": self._sender,
                "period": self._period,
                "sequence": self._seq,
                "kind": self._kind,
                "batch_digest": header["digest"],
                "lines": totals.lines,
                **self.counts,
                "claimed_fen": totals.claimed_fen,
                "accepted_claim_fen": self.accepted_claim,
                "verdicts_digest": vdigest.hexdigest(),
                "verdict_chunks": vdigest.chunks,
            },
            Purpose.ACK,
        )
        self._db.execute(
            "INSERT INTO in_batches (sender, period, seq, kind, digest, lines, claimed_fen, "
            "accepted_claim_fen, ack, ack_key_id, ack_signature, received_at) VALUES (?, ?, "
            "?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                self._sender,
                self._period,
                self._seq,
                self._kind,
                header["digest"],
                totals.lines,
                totals.claimed_fen,
                self.accepted_claim,
                ack.document.decode(),
                ack.key_id,
                b64(ack.signature),
                utc_text(now),
            ),
        )
        self._db.executemany(
            "INSERT INTO in_ack_chunks (sender, period, seq, chunk_no, data) VALUES (?, ?, ?, "
            "?, ?)",
            [(self._sender, self._period, self._seq, i, b64(c)) for i, c in enumerate(chunks)],
        )
        crash.point("home_before_commit")
        return Ack(chunks, ack)


def presentment_digest(t: Trip) -> str:
    """:meth:`Trip.presentment_digest`, inline: the same text hashed, for every first line."""
    at = t.occurred_at if t.occurred_at.tzinfo is UTC else t.occurred_at.astimezone(UTC)
    c = t.card
    text = (
        f"{t.operator_id}\x00{t.trip_id}\x00{c.issuer_region}\x00{c.card_number}\x00"
        f"{t.scene.value}\x00{t.place_id}\x00{at.isoformat()}"
    )
    if t.gate_id:
        text = f"{text}\x00{t.gate_id}"
    return hashlib.sha256(text.encode()).hexdigest()


def correctable(t: Trip) -> str:
    """:func:`broker.settlement.trips.correctable_values`, inline."""
    entitlement = t.applied_entitlement.value if t.applied_entitlement else 0
    return f"{entitlement}|{t.gross_fare_fen}|{t.charged_fen}|{t.concession_fen}|{t.fare_version}"


def previous_lines(
    db: Db, sender: str, keys: list[tuple[str, str]]
) -> dict[tuple[str, str], tuple[str, int]]:
    """The stored (code, attempt) of the lines among ``keys`` received before: one query
    per operator and 500 trip ids, not one per line."""
    by_operator: dict[str, list[str]] = {}
    for op, trip in keys:
        by_operator.setdefault(op, []).append(trip)
    found: dict[tuple[str, str], tuple[str, int]] = {}
    for op, trips in by_operator.items():
        for i in range(0, len(trips), 500):
            some = trips[i : i + 500]
            for trip, code, attempt in db.all(
                "SELECT trip_id, code, attempt FROM in_lines WHERE sender = ? "
                f"AND operator_id = ? AND trip_id IN ({', '.join('?' * len(some))})",
                (sender, op, *some),
            ):
                found[(op, str(trip))] = (str(code), int(attempt))
    return found
