"""The home district's side of clearing: published fare rules, batches, day confirmations.

Each call is checked before anything is stored: the sender is the caller's
district (from its certificate), its signature verifies under a settlement
key in its trust bundle, the digest over the chunks as received matches the
signed one, and the totals add up. Then every line is checked
(:mod:`broker.settlement.clearing.verify`) and the verdicts, the lines, the cap usage
and the signed acknowledgement are committed in one transaction before the
acknowledgement is sent. A batch sent again (same sequence, same digest)
gets the stored acknowledgement again; other content under a used sequence
is a :class:`Conflict`.

Replicas of a district may share one PostgreSQL schema. Each verification
holds one advisory lock of the home district for its whole transaction
(cap counts are read and written under it, so two batches cannot both take
a holder's last capped use), and looks for the batch again once it holds it
(the same batch received by two replicas at once: the second gets the
first's acknowledgement). The own-usage watermark is read before, under the
brief lock a close takes (:meth:`broker.core.db.Db.lock_trips`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import date, datetime, timedelta
from typing import Any

import structlog

from broker.cards.model import shanghai_day
from broker.cards.registry import Registry
from broker.core.db import utc_text
from broker.core.errors import Conflict, DocumentRefused, SettlementStateError
from broker.core.planner import Statistics
from broker.core.signing import PublicKey, Purpose, Signed, Signer, canonical, parse, verify
from broker.fares.agreements import Agreement
from broker.fares.rules import CHANGEOVER_GRACE, FareSchedule, FareTable, parse_fares
from broker.settlement.clearing import staged
from broker.settlement.clearing.batch import Digest, Spool
from broker.settlement.clearing.confirm import (
    addressed,
    mirrors,
    position_doc,
    refuse_if_settled,
    require_ready,
    store_settled,
)
from broker.settlement.clearing.positions import (
    Position,
    SettledDay,
    settled_day,
    settled_figures,
)
from broker.settlement.clearing.received import Ack, AckChunks, BatchCheck, Previous
from broker.settlement.clearing.store import ClearingStore, unb64
from broker.settlement.clearing.tail import Hint, StreamEnded
from broker.settlement.clearing.verify import CapCounter, LineChecker
from broker.settlement.ledger.common import TRIP_COLUMNS, trip_from_row
from broker.settlement.statements import scheme_of

log = structlog.get_logger(__name__)

__all__ = ["Ack", "KeysOf", "Receiver"]

KeysOf = Callable[[str], Mapping[str, PublicKey]]


class Receiver:
    """Runs on the home node; every method is synchronous and meant for one worker thread."""

    def __init__(
        self,
        district: str,
        store: ClearingStore,
        signer: Signer,
        registry: Registry,
        keys_of: KeysOf,
        agreement: Callable[[str], Agreement | None],
        own_fares: FareSchedule | None,
        clock: Callable[[], datetime],
        changeover_grace: timedelta = CHANGEOVER_GRACE,
    ) -> None:
        self._district = district
        self._store = store
        self._db = store.db
        self._signer = signer
        self._registry = registry
        self._keys_of = keys_of
        self._agreement = agreement
        self._own_fares = own_fares
        self._clock = clock
        self._grace = changeover_grace
        self._in_lines = Statistics(self._db, "in_lines")

    # ------------------------------------------------------------ fare rules

    def publish_fares(self, sender: str, signed: Signed) -> list[str]:
        """Store the versions of ``sender``'s signed fare rules not held yet; none ever changes."""
        doc = verify(signed, self._keys_of(sender), Purpose.FARES)
        if doc.get("type") != "fares" or doc.get("district") != sender:
            raise DocumentRefused("not a fare-rules document of the calling district")
        schedule = parse_fares(doc, f"fares of {sender}")
        now = utc_text(self._clock())
        with self._db.write():
            for table in schedule.tables:
                body = canonical(_table_doc(doc, table.version))
                digest = Digest()
                digest.update(body)
                held = self._db.one(
                    "SELECT digest FROM published_fares WHERE district = ? AND version = ?",
                    (sender, table.version),
                )
                if held is None:
                    self._db.execute(
                        "INSERT INTO published_fares (district, version, digest, document, "
                        "received_at) VALUES (?, ?, ?, ?, ?)",
                        (sender, table.version, digest.hexdigest(), body.decode(), now),
                    )
                elif held[0] != digest.hexdigest():
                    raise Conflict(
                        f"fare rules {table.version} of {sender} were published before "
                        "with other content"
                    )
        return [t.version for t in schedule.tables]

    def _fare_table(self, sender: str) -> Callable[[str], FareTable | None]:
        cache: dict[str, FareTable | None] = {}

        def table(version: str) -> FareTable | None:
            if version not in cache:
                row = self._db.one(
                    "SELECT document FROM published_fares WHERE district = ? AND version = ?",
                    (sender, version),
                )
                cache[version] = (
                    parse_fares(parse(row[0], "stored fares")).tables[0] if row else None
                )
            return cache[version]

        return table

    def _fares_in_force(self, sender: str) -> Callable[[str, datetime], bool]:
        """Whether a version of ``sender``'s published rules was in force at an instant."""
        rows = self._db.all("SELECT document FROM published_fares WHERE district = ?", (sender,))
        tables = [parse_fares(parse(r[0], "stored fares")).tables[0] for r in rows]
        schedule = FareSchedule(sender, tuple(sorted(tables, key=lambda t: t.effective_from)))
        return lambda version, at: schedule.in_force(version, at, self._grace)

    # ------------------------------------------------------------ batches

    def receive(self, sender: str, spool: Spool, trailer: Signed) -> Ack:
        """Verify a received batch and answer it; the answer is durable before it is returned."""
        header, period, seq, kind = self.batch_header(sender, trailer, spool.digest)
        stored = self._stored_ack(sender, period, seq, header)
        if stored is not None:
            return stored
        refuse_if_settled(self._db, sender, period)
        return self._verify_and_ack(sender, period, seq, kind, header, spool)

    def receive_streamed(
        self,
        sender: str,
        hint: Hint,
        chunks: Iterable[bytes],
        digest: Digest,
        trailer: Callable[[], Signed],
    ) -> Ack | None:
        """Verify ``sender``'s batch as its chunks arrive, taking the sender's word
        (``hint``) for which batch it is; commit only if its trailer checks out then and
        names that batch, exactly as :meth:`receive` would have committed it.

        ``chunks`` ends when the stream does (:class:`StreamEnded` if it broke off);
        ``digest`` is over what it gave, ``trailer()`` the trailer then. ``None``: not
        verified as it came (the stream broke off or stalled, the batch was received
        before or its day settled, a chunk did not read, the word was wrong); nothing is
        kept, and the caller verifies the whole spool with :meth:`receive`, which answers
        as it always does. A trailer that does not check out is refused as there.
        """
        high = self._ledger_watermark()
        day = hint.period.isoformat()

        def begin() -> Ack | None:
            if self._db.one(
                "SELECT 1 FROM in_batches WHERE sender = ? AND period = ? AND seq = ?",
                (sender, day, hint.seq),
            ):
                raise _Unverified  # :meth:`receive` answers with the stored one
            refuse_if_settled(self._db, sender, hint.period)
            self._sync_own_usage(high)
            return None

        def add(check: BatchCheck, chunk: bytes) -> None:
            try:
                check.add(chunk)
            except DocumentRefused as exc:  # refused there after the trailer's checks
                raise _Unverified from exc

        def finish(check: BatchCheck) -> Ack:
            header, period, seq, kind = self.batch_header(sender, trailer(), digest)
            if Hint(period, seq, kind) != hint:
                raise _Unverified
            return check.finish(self._district, header, self._signer, self._clock())

        try:
            ack, check = self._verify(
                sender, hint.period, hint.seq, hint.kind, begin, chunks, add, finish
            )
        except (_Unverified, StreamEnded, SettlementStateError):
            return None
        if check is not None:
            self.log_received(sender, hint.period, hint.seq, check)
        return ack

    def _verify(
        self,
        sender: str,
        period: date,
        seq: int,
        kind: str,
        begin: Callable[[], Ack | None],
        chunks: Iterable[bytes],
        add: Callable[[BatchCheck, bytes], None],
        finish: Callable[[BatchCheck], Ack],
    ) -> tuple[Ack, BatchCheck | None]:
        """Check ``chunks`` and acknowledge the batch, under the home's verification lock:
        ``begin()`` first (an answer already stored ends it there), ``finish`` in the
        transaction that commits. A close on SQLite is committed in parts
        (:mod:`broker.settlement.clearing.staged`), each part's log copied into the file
        before the next part, and unmade if anything fails after the first."""
        parts = staged.in_parts(self._db, kind)
        day, lines = period.isoformat(), iter(chunks)
        check: BatchCheck | None = None
        try:
            while True:
                with self._db.write():
                    # One verification of this home's card-holders at a time, across
                    # replicas: caps.
                    self._db.lock_for_transaction(f"verify/{self._district}")
                    if check is None:
                        if self._db.dialect == "sqlite":
                            staged.unmake(self._db)  # the parts of a batch a verifier died in
                        stored = begin()
                        if stored is not None:
                            return stored, None
                        check = self.batch_check(sender, period, seq, kind)
                        if parts:
                            staged.mark(self._db, sender, day, seq, utc_text(self._clock()))
                    limit = check.totals.lines + staged.PART_LINES if parts else None
                    for chunk in lines:
                        add(check, chunk)
                        if limit is not None and check.totals.lines >= limit:
                            break  # this part is committed; the next one follows
                    else:
                        if parts:  # a confirmation may have settled the day meanwhile
                            refuse_if_settled(self._db, sender, period)
                            staged.done(self._db, sender, day, seq)
                        return finish(check), check
                log.info(
                    "batch_part_committed",
                    sender=sender,
                    period=day,
                    sequence=seq,
                    lines=check.totals.lines,
                )
                self._store.checkpoint_now()
        except BaseException:
            if parts and check is not None:  # parts may be committed: none of them stays
                with self._db.write():
                    staged.unmake(self._db)
            raise

    def batch_header(
        self, sender: str, trailer: Signed, digest: Digest
    ) -> tuple[dict[str, Any], date, int, str]:
        """The signed header of ``sender``'s batch whose chunks hash to ``digest``, with its
        period, sequence and kind; refused if it does not describe them."""
        header = verify(trailer, self._keys_of(sender), Purpose.BATCH)
        if header.get("type") != "batch" or header.get("from") != sender:
            raise DocumentRefused("trailer is not a batch header of the calling district")
        if header.get("to") != self._district:
            raise DocumentRefused(f"batch is addressed to {header.get('to')}, not this district")
        if header.get("digest") != digest.hexdigest() or header.get("chunks") != digest.chunks:
            raise DocumentRefused("batch digest does not match the chunks received")
        seq = header.integer("sequence")
        kind = header.text("kind")
        try:
            period = date.fromisoformat(header.text("period"))
        except ValueError as exc:
            raise DocumentRefused("batch-trailer document: field 'period' is not a date") from exc
        if kind not in ("close", "represent"):
            raise DocumentRefused("batch kind must be close or represent")
        return header, period, seq, kind

    def _stored_ack(
        self, sender: str, period: date, seq: int, header: dict[str, Any]
    ) -> Ack | None:
        """The acknowledgement stored for this batch, if it was received before."""
        held = self._db.one(
            "SELECT digest, ack, ack_key_id, ack_signature FROM in_batches "
            "WHERE sender = ? AND period = ? AND seq = ?",
            (sender, period.isoformat(), seq),
        )
        if held is None:
            return None
        if held[0] != header["digest"]:
            raise Conflict(f"batch {sender}/{period}/{seq} was received with other content")
        top = self._db.one(
            "SELECT count(*) FROM in_ack_chunks WHERE sender = ? AND period = ? AND seq = ?",
            (sender, period.isoformat(), seq),
        )
        chunks = AckChunks(self._db, sender, period.isoformat(), seq, int(top[0]) if top else 0)
        return Ack(chunks, Signed(held[1].encode(), held[2], unb64(held[3])))

    def _verify_and_ack(
        self, sender: str, period: date, seq: int, kind: str, header: dict[str, Any], spool: Spool
    ) -> Ack:
        high = self._ledger_watermark()

        def begin() -> Ack | None:
            stored = self._stored_ack(sender, period, seq, header)  # another replica's, meanwhile
            if stored is None:
                self._sync_own_usage(high)
            return stored

        def finish(check: BatchCheck) -> Ack:
            return check.finish(self._district, header, self._signer, self._clock())

        ack, check = self._verify(
            sender, period, seq, kind, begin, spool.chunks(), BatchCheck.add, finish
        )
        if check is not None:
            self.log_received(sender, period, seq, check)
        return ack

    def batch_check(self, sender: str, period: date, seq: int, kind: str) -> BatchCheck:
        """The check of one batch's lines (inside the verification's transaction)."""

        def checker(previous: Previous) -> LineChecker:
            return LineChecker(
                own_district=self._district,
                sender=sender,
                period=period,
                registry=self._registry,
                fare_table=self._fare_table(sender),
                fares_in_force=self._fares_in_force(sender),
                changeover_grace=self._grace,
                agreement=self._agreement(sender),
                caps=CapCounter(self._db),
                previous=previous,
                representment=kind == "represent",
                presented=lambda op, trip: self._presented(sender, op, trip),
            )

        return BatchCheck(self._db, sender, period, seq, kind, checker, self._in_lines)

    @staticmethod
    def log_received(sender: str, period: date, seq: int, check: BatchCheck) -> None:
        log.info(
            "batch_received",
            sender=sender,
            period=period.isoformat(),
            sequence=seq,
            lines=check.totals.lines,
            **check.counts,
        )

    def _presented(
        self, sender: str, operator_id: str, trip_id: str
    ) -> tuple[str, str | None] | None:
        """A line's first presentment: its digest and correctable values (None for lines of
        the release that kept no digest). Kept in ``in_lines`` beside the line; lines stored
        before clearing migration 6 have theirs in ``in_line_presentments``."""
        key = (sender, operator_id, trip_id)
        where = "WHERE sender = ? AND operator_id = ? AND trip_id = ?"
        row = self._db.one(f"SELECT digest, correctable FROM in_lines {where}", key)
        if row is None or row[0] is None:
            row = self._db.one(f"SELECT digest, correctable FROM in_line_presentments {where}", key)
        return (str(row[0]), None if row[1] is None else str(row[1])) if row else None

    def _ledger_watermark(self) -> int:
        """The ledger's highest ``ingest_seq``, every trip below it committed.

        On PostgreSQL a trip takes its number before it commits: read under the
        brief lock a close takes, in a transaction of its own, which waits for
        the trip writes in flight. SQLite numbers trips in commit order.
        """
        trips = self._store.trips
        if trips.dialect != "postgres":
            top = trips.one("SELECT coalesce(max(ingest_seq), 0) FROM trips")
            return int(top[0]) if top else 0
        with trips.write():
            trips.lock_trips()
            top = trips.one("SELECT coalesce(max(ingest_seq), 0) FROM trips")
        return int(top[0]) if top else 0

    def _sync_own_usage(self, high: int) -> None:
        """Count this district's own operators' concessions to its own card-holders against caps,
        up to ledger watermark ``high``."""
        mark = int(self._store.meta("own_usage_seq", "0"))
        if high <= mark:
            return
        caps = CapCounter(self._db)
        for block in self._store.trips.stream(
            f"SELECT {TRIP_COLUMNS} FROM trips WHERE ingest_seq > ? AND ingest_seq <= ? "
            "AND issuer_region = ? AND outcome = 'accepted' AND concession_fen > 0",
            (mark, high, self._district),
        ):
            for row in block:
                trip = trip_from_row(row)
                scheme = scheme_of(trip, self._own_fares)
                card = self._registry.lookup(trip.card.card_number)
                if scheme is None or card is None:
                    continue
                caps.count(
                    f"{self._district}|{trip.operator_id}|{trip.trip_id}",
                    card.holder_key,
                    scheme,
                    shanghai_day(trip.occurred_at),
                    trip.occurred_at.isoformat(),
                )
        self._store.set_meta("own_usage_seq", str(high))

    # ------------------------------------------------------------ day confirmation

    def confirm(self, sender: str, signed: Signed) -> Signed:
        """Compare the sender's view of a day's bilateral position with ours; equal is SETTLED.

        The same readiness checks as the sender's apply to this side. A day
        already SETTLED is answered from the figures both signed then (agreed if
        the sender's are the same; Ed25519 signs the same document the same way).
        """
        theirs = verify(signed, self._keys_of(sender), Purpose.POSITION)
        try:
            period = date.fromisoformat(theirs.text("period"))
        except ValueError as exc:
            raise DocumentRefused("day-position document: field 'period' is not a date") from exc
        if not addressed(theirs, sender, self._district, period):
            raise DocumentRefused(
                "not a position document of the calling district addressed to this district"
            )
        with self._db.write():
            agreed = settled_day(self._db, sender, period)
            if agreed is not None:  # answered from the signed figures, whatever is asked
                receivable, payable = settled_figures(agreed)
                mine = Position(sender, receivable, payable, "settled")
            else:
                mine = require_ready(self._store, sender, period, self._clock())
            same = mirrors(theirs, mine)
            reply = self._signer.sign(
                {**position_doc(self._district, sender, period, mine), "agreed": same},
                Purpose.POSITION,
            )
            if same and agreed is None:
                store_settled(
                    self._db, sender, period, mine, SettledDay(reply, signed), self._clock()
                )
        return reply


class _Unverified(Exception):
    """Not verified as the batch arrived: :meth:`Receiver.receive` verifies the spool."""


def _table_doc(doc: Mapping[str, Any], version: str) -> dict[str, Any]:
    """One version of a published fare-rules document, as stored."""
    table = next(t for t in doc.get("table", []) if t.get("version") == version)
    return {"district": doc.get("district"), "table": [table]}
