"""One received batch's lines, checked and written chunk by chunk, then acknowledged.

:class:`BatchCheck` runs inside the transaction of a verification
(:class:`broker.settlement.clearing.receiver.Receiver`): each chunk's lines are
decoded, checked (:class:`broker.settlement.clearing.verify.LineChecker`) and
written before the next chunk is read, so a duplicate later in the same batch
is seen, and nothing of the batch is held in memory but its running totals and
the verdicts of the chunk of verdicts being filled (each full one is written to
``in_ack_chunks`` at once, and read back from there as it is sent:
:class:`AckChunks`). :meth:`BatchCheck.finish` compares the totals with
the signed header, signs the acknowledgement and writes it; the caller commits.
Whether the chunks come from a complete spool or as they arrive makes no
difference here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from broker.core.db import Db, utc_text
from broker.core.errors import DocumentRefused
from broker.core.planner import Statistics
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
from broker.settlement.clearing.store import b64, unb64
from broker.settlement.clearing.verify import CAP_EXCEEDED, OK, REJECTIONS, LineChecker
from broker.settlement.trips import Trip

Previous = Callable[[str, str], tuple[str, int] | None]  # (operator, trip) → (code, attempt)

# Codes of lines that are not stored: the line already was, or is not this home's.
_NOT_STORED = frozenset({"DUPLICATE", "NOT_DISPUTED", "WRONG_DISTRICT"})


class AckChunks:
    """The verdict chunks of a stored acknowledgement, read from ``in_ack_chunks`` a few at a
    time as they are sent: a big batch's verdicts are never all in one process's memory.

    Read through ``db``; an instance that crossed a process (the verifier's answer to the
    node) has none until :meth:`bound` gives it the node's own connection.
    """

    PAGE = 16  # chunks per query

    def __init__(self, db: Db | None, sender: str, period: str, seq: int, count: int) -> None:
        self._db = db
        self.key = (sender, period, seq)
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[bytes]:
        db = self._db
        if db is None:
            raise RuntimeError("acknowledgement chunks read without a database")
        for start in range(0, self.count, self.PAGE):
            for (data,) in db.all(
                "SELECT data FROM in_ack_chunks WHERE sender = ? AND period = ? AND seq = ? "
                "AND chunk_no >= ? AND chunk_no < ? ORDER BY chunk_no",
                (*self.key, start, start + self.PAGE),
            ):
                yield unb64(data)

    def bound(self, db: Db) -> AckChunks:
        return AckChunks(db, *self.key, self.count)

    def __eq__(self, other: object) -> bool:
        """The chunks of the same stored acknowledgement (whatever reads them)."""
        if not isinstance(other, AckChunks):
            return NotImplemented
        return (self.key, self.count) == (other.key, other.count)

    def __hash__(self) -> int:
        return hash((self.key, self.count))

    def __reduce__(self) -> tuple[Any, ...]:
        return (AckChunks, (None, *self.key, self.count))  # a connection does not cross


@dataclass(frozen=True)
class Ack:
    """What goes back to the sender: verdict chunks, then the signed acknowledgement."""

    chunks: AckChunks
    signed: Signed

    def bound(self, db: Db) -> Ack:
        """This acknowledgement with its chunks read through ``db``."""
        return Ack(self.chunks.bound(db), self.signed)


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
        stats: Statistics | None = None,
    ) -> None:
        """``stats``: ``in_lines``' planner statistics, told of the lines written (the
        duplicate lookups of a million-line batch on PostgreSQL are planned by them)."""
        self._db = db
        self._stats = stats
        self._sender = sender
        self._period = period.isoformat()
        self._seq = seq
        self._kind = kind
        self._attempt = 2 if kind == "represent" else 1
        self.totals = Totals()
        self.counts = {"accepted": 0, "cap_exceeded": 0, "rejected": 0}
        self.accepted_claim = 0
        self._verdicts: list[Verdict] = []  # encoded into chunks as they fill
        self._vdigest = Digest()  # over the verdict chunks written so far
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
        sender, period, seq, attempt = self._sender, self._period, self._seq, self._attempt
        first = attempt == 1  # a first presentment: a representment of it must match it
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
                    self._store_verdicts()
            if code not in _NOT_STORED:
                self._pending[(t.operator_id, t.trip_id)] = (code, attempt)
                # Only a rejected line may be represented: only its first presentment is
                # ever matched, so only it keeps its digest and values.
                disputable = first and code in REJECTIONS
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
                        presentment_digest(t) if disputable else None,
                        correctable(t) if disputable else None,
                    )
                )
            self._line_no += 1
        # Written per chunk, so a duplicate later in the same batch is seen.
        self._write(rows)
        self._pending.clear()

    def _write(self, rows: list[tuple[Any, ...]]) -> None:
        """The chunk's stored lines; a representment's overwrites the line's verdict and
        keeps its first presentment's digest and values (those of a rejected line)."""
        self._db.executemany(
            "INSERT INTO in_lines (sender, operator_id, trip_id, period, seq, attempt, "
            "code, claimed_fen, accepted_claim_fen, digest, correctable) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (sender, operator_id, trip_id) DO UPDATE SET "
            "seq = excluded.seq, attempt = excluded.attempt, code = excluded.code, "
            "claimed_fen = excluded.claimed_fen, "
            "accepted_claim_fen = excluded.accepted_claim_fen",
            rows,
        )
        if self._stats is not None:
            self._stats.grew(len(rows))

    def _store_verdicts(self) -> None:
        """Encode the verdicts held into the next chunk and write it (in the transaction)."""
        chunk = encode_verdicts(self._verdicts)
        self._verdicts = []
        self._db.execute(
            "INSERT INTO in_ack_chunks (sender, period, seq, chunk_no, data) VALUES (?, ?, ?, "
            "?, ?)",
            (self._sender, self._period, self._seq, self._vdigest.chunks, b64(chunk)),
        )
        self._vdigest.update(chunk)

    def finish(self, own: str, header: dict[str, Any], signer: Signer, now: datetime) -> Ack:
        """Check the totals against the signed header, sign the acknowledgement and write it
        (inside the caller's transaction, which commits it)."""
        totals = self.totals
        stated = {k: header.get(k) for k in totals.as_doc()}
        if stated != totals.as_doc():
            raise DocumentRefused("batch totals do not match its lines")
        if self._verdicts:
            self._store_verdicts()
        vdigest = self._vdigest
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
        crash.point("home_before_commit")
        return Ack(AckChunks(self._db, self._sender, self._period, self._seq, vdigest.chunks), ack)


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
    if t.decision_source:
        text = f"{text}\x00\x01{t.decision_source.value}"
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
