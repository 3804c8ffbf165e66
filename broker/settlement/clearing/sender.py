"""The serving district's side of clearing: close a day, send batches, represent, confirm.

A close first fixes what it covers, durably: the ledger watermark
(``ingest_seq``) and one ``built`` batch per home district with that day's
accepted trips in (previous watermark, watermark]. Only then are batches
sent; each is rebuilt from its range in the same order, so a batch sent
again after a crash is byte for byte the one sent before and the home
district answers with the acknowledgement it stored. A trip that arrives
after its day was closed falls in the next close of that day: a
supplementary batch (sequence 2, 3, …). A close never waits for the late
window.

Crash points (``broker.settlement.clearing.crash``), in order: ``close_planned``,
``fares_published``, ``batch_sent`` (acknowledged by the home district, not
yet stored here), ``ack_stored``, ``represent_built``, ``position_agreed``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import grpc
import structlog

from broker._proto.yikatong.v1 import settlement_pb2, settlement_pb2_grpc
from broker.core.db import utc_text
from broker.core.errors import DocumentRefused, PeerUnavailable, SettlementStateError
from broker.core.signing import PublicKey, Purpose, Signed, Signer, verify
from broker.fares.rules import FareSchedule, fares_document
from broker.settlement.clearing import crash
from broker.settlement.clearing.acks import store_ack
from broker.settlement.clearing.batch import (
    Digest,
    Line,
    Spool,
    Totals,
    chunked,
    decode_lines,
    verdict_rows,
)
from broker.settlement.clearing.confirm import (
    addressed,
    mirrors,
    position_doc,
    require_ready,
    store_settled,
)
from broker.settlement.clearing.disputes import build_represent, resolve
from broker.settlement.clearing.positions import Position, SettledDay, position
from broker.settlement.clearing.rows import RowEncoder, counting, row_chunks, scheme_by
from broker.settlement.clearing.store import ClearingStore, next_seq, unb64
from broker.settlement.clearing.tail import Hint
from broker.settlement.clearing.verify import CAP_EXCEEDED, claim
from broker.settlement.config import SettlementSettings
from broker.settlement.days import require_ended, window_end
from broker.settlement.ledger.common import TRIP_COLUMNS
from broker.settlement.ledger.store import seal_day
from broker.settlement.statements import scheme_of
from broker.settlement.trips import Trip
from broker.settlement.wire import signed_to_wire

log = structlog.get_logger(__name__)

EXCHANGE_TIMEOUT_S = 900.0


@dataclass
class BatchResult:
    counterparty: str
    period: str
    sequence: int
    kind: str
    lines: int
    claimed_fen: int
    accepted_claim_fen: int
    rejected: int
    cap_exceeded: int


@dataclass
class CloseReport:
    period: str
    close_no: int | None
    batches: list[BatchResult] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # home districts not reached


def line_for(trip: Trip, cfg: SettlementSettings, fares: FareSchedule | None) -> Line:
    """A ledger trip as a batch line, with its scheme and the claim under the agreement."""
    scheme = scheme_of(trip, fares) or ""
    amount = claim(
        cfg.agreement(trip.card.issuer_region), trip.charged_fen, trip.concession_fen, scheme
    )
    return Line(trip, scheme, amount)


class Sender:
    """Closes days and exchanges batches for one district (run by ``broker settle``)."""

    def __init__(
        self,
        cfg: SettlementSettings,
        store: ClearingStore,
        signer: Signer,
        fares: FareSchedule | None,
        channel: Callable[[str], grpc.aio.Channel],
        keys_of: Callable[[str], Mapping[str, PublicKey]],
        clock: Callable[[], datetime],
        progress: Callable[[str, int], None] = lambda what, n: None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self._db = store.db
        self._signer = signer
        self._fares = fares
        self._channel = channel
        self._keys_of = keys_of
        self._clock = clock
        self._progress = progress
        self._own = cfg.district

    def _stub(self, district: str) -> settlement_pb2_grpc.SettlementStub:
        if self.cfg.peer(district) is None:
            raise SettlementStateError(f"district {district} is not a configured peer")
        return settlement_pb2_grpc.SettlementStub(self._channel(district))

    # ------------------------------------------------------------ fare rules

    async def publish_fares(self, district: str) -> list[str]:
        """Send this district's signed fare rules to a peer (idempotent)."""
        if self._fares is None:
            return []
        doc = {"type": "fares", **fares_document(self._fares), "district": self._own}
        signed = self._signer.sign(doc, Purpose.FARES)
        try:
            reply = await self._stub(district).PublishFares(
                signed_to_wire(signed),
                timeout=30,
            )
        except grpc.aio.AioRpcError as exc:
            raise PeerUnavailable(
                district, f"PublishFares: {exc.code().name} {exc.details()}"
            ) from exc
        return list(reply.versions)

    # ------------------------------------------------------------ close

    def plan_close(self, period: date, force: bool = False) -> int | None:
        """Fix what the next close of ``period`` covers; ``None`` if nothing is new.

        Resumes (returns the last close) while a batch of it is not acknowledged.
        A day that has not ended is refused unless ``force``. A close after the
        day's late window first seals the day in the ledger (no trip of it is
        accepted after that) and covers everything up to the sealing watermark.
        """
        now = self._clock()
        if not force:
            require_ended(period, now, "close")
        if now < window_end(period):
            planned = self._plan(period, None)
        else:
            with self.store.trips.write():  # the ledger's write lock, to the end of the plan
                planned = self._plan(period, seal_day(self.store.trips, period, now))
        crash.point("close_planned")
        return planned

    def _plan(self, period: date, sealed_at: int | None) -> int | None:
        day = period.isoformat()
        with self._db.write():
            # Resume while a batch to a peer is unacknowledged (one to a non-peer waits apart).
            waiting = self._db.all(
                "SELECT DISTINCT counterparty FROM out_batches WHERE period = ? "
                "AND kind = 'close' AND state = 'built'",
                (day,),
            )
            pending = sum(1 for (c,) in waiting if self.cfg.peer(str(c)) is not None)
            last = self._db.one(
                "SELECT close_no, watermark FROM day_closes WHERE period = ? "
                "ORDER BY close_no DESC LIMIT 1",
                (day,),
            )
            close_no, low = (int(last[0]), int(last[1])) if last else (0, 0)
            if pending and sealed_at is None:
                return close_no
            # The sealing close plans up to the seal even while an earlier batch waits:
            # the ranges do not overlap, and no trip of the day can come after it.
            if sealed_at is not None:
                high = sealed_at
            else:
                if self.store.trips is self._db:
                    self._db.lock_trips()  # PostgreSQL: no trip write in flight below the mark
                top = self.store.trips.one("SELECT coalesce(max(ingest_seq), 0) FROM trips")
                high = int(top[0]) if top else 0
            homes = self.store.trips.all(
                "SELECT DISTINCT issuer_region FROM trips WHERE settlement_day = ? "
                "AND outcome = 'accepted' AND ingest_seq > ? AND ingest_seq <= ? "
                "AND issuer_region <> ?",
                (day, low, high, self._own),
            )
            if not homes:
                return None
            now = utc_text(self._clock())
            close_no += 1
            self._db.execute(
                "INSERT INTO day_closes (period, close_no, watermark, created_at) VALUES (?, ?, "
                "?, ?)",
                (day, close_no, high, now),
            )
            for (home,) in sorted(homes):
                # Every home gets its batch, peer or not: no accepted trip is left behind.
                self._db.execute(
                    "INSERT INTO out_batches (counterparty, period, seq, kind, lo, hi, state, "
                    "created_at) VALUES (?, ?, ?, 'close', ?, ?, 'built', ?)",
                    (home, day, next_seq(self._db, home, day), low, high, now),
                )
        return close_no

    async def close(self, period: date, force: bool = False) -> CloseReport:
        """Close ``period``: fix the batches, then publish fare rules to and send every
        unacknowledged batch to each home district. One that cannot be reached (or is
        not a peer) holds up no other: its batches stay ``built``, reported as failures.

        One close of a period runs at a time, on any host: a second one says which
        close runs (``close_waiting``), waits for it to end, then goes on from there.
        """
        day = period.isoformat()
        lock = self._db.held(
            f"close/{day}", lambda who: log.warning("close_waiting", period=day, running=who)
        )
        await asyncio.to_thread(lock.__enter__)
        try:
            return await self._close(period, force)
        finally:
            await asyncio.to_thread(lock.__exit__, None, None, None)

    async def _close(self, period: date, force: bool) -> CloseReport:
        close_no = await asyncio.to_thread(self.plan_close, period, force)
        report = CloseReport(period.isoformat(), close_no)
        rows = self._db.all(
            "SELECT counterparty, seq FROM out_batches WHERE period = ? AND state = 'built' "
            "ORDER BY counterparty, seq",
            (period.isoformat(),),
        )
        for home in sorted({str(c) for c, _ in rows}):
            if self.cfg.peer(home) is None:
                held = sum(1 for c, _ in rows if c == home)
                log.warning("close_incomplete", district=home, error="not a configured peer")
                report.failures.append(
                    f"district {home}: not a configured peer; {held} "
                    "batch(es) wait until [[peers]] names it"
                )
                continue
            try:
                await self.publish_fares(home)
                crash.point("fares_published")
                for c, seq in rows:
                    if c == home:
                        report.batches.append(await self.send(home, period, int(seq)))
            except (PeerUnavailable, DocumentRefused, SettlementStateError) as exc:
                # One home holds up no other.
                log.warning("close_incomplete", district=home, error=str(exc))
                report.failures.append(f"district {home}: {exc}")
        return report

    # ------------------------------------------------------------ one batch

    def _batch_row(self, counterparty: str, day: str, seq: int) -> tuple[Any, ...]:
        row = self._db.one(
            "SELECT kind, lo, hi, payload, created_at, state FROM out_batches "
            "WHERE counterparty = ? AND period = ? AND seq = ?",
            (counterparty, day, seq),
        )
        if row is None:
            raise SettlementStateError(f"no batch {counterparty}/{day}/{seq}")
        return row

    def _chunks(
        self,
        counterparty: str,
        period: date,
        row: tuple[Any, ...],
        totals: Totals,
        by_operator: dict[str, tuple[int, int]],
    ) -> Iterator[tuple[bytes, int]]:
        """The batch's chunks, counted into ``totals`` and ``by_operator`` as they are cut."""
        kind, lo, hi, payload = row[0], int(row[1]), int(row[2]), row[3]
        if kind == "represent":
            lines = iter(decode_lines(unb64(payload)))
            return chunked(counting(lines, totals, by_operator))
        # A close: the ledger's rows encoded as they are read (no Trip or message per line).
        blocks = self.store.trips.stream(
            f"SELECT {TRIP_COLUMNS} FROM trips WHERE settlement_day = ? AND issuer_region = ? "
            "AND outcome = 'accepted' AND ingest_seq > ? AND ingest_seq <= ? "
            "ORDER BY occurred_at, operator_id, trip_id",
            (period.isoformat(), counterparty, lo, hi),
        )
        encoder = RowEncoder(scheme_by(self._fares), self.cfg.agreement)
        return row_chunks(blocks, encoder, totals, by_operator)

    async def send(self, counterparty: str, period: date, seq: int) -> BatchResult:
        """Send one batch (again, if it was sent before) and store the acknowledgement."""
        day = period.isoformat()
        row = self._batch_row(counterparty, day, seq)
        kind, created_at = str(row[0]), str(row[4])
        totals = Totals()
        by_operator: dict[str, tuple[int, int]] = {}  # (lines, claim) as sent, per operator
        digest = Digest()
        chunks = self._chunks(counterparty, period, row, totals, by_operator)

        def next_chunk() -> tuple[bytes, int] | None:
            return next(chunks, None)

        first = await asyncio.to_thread(next_chunk)  # before the call: a big day sorts first

        async def parts() -> AsyncIterator[settlement_pb2.BatchPart]:
            item = first
            while item is not None:
                digest.update(item[0])
                self._progress("lines sent", totals.lines)
                yield settlement_pb2.BatchPart(lines=item[0])
                item = await asyncio.to_thread(next_chunk)
            signed = self._signer.sign(
                {
                    "type": "batch",
                    "from": self._own,
                    "to": counterparty,
                    "period": day,
                    "sequence": seq,
                    "kind": kind,
                    "created_at": created_at,
                    **totals.as_doc(),
                    "digest": digest.hexdigest(),
                    "chunks": digest.chunks,
                },
                Purpose.BATCH,
            )
            yield settlement_pb2.BatchPart(trailer=signed_to_wire(signed))

        # The home district's verdicts go to disk as they come: a million rejected lines
        # must not be held in memory. Only their sums are kept.
        verdicts = Spool()
        cut = listed = rejected = 0
        ack: Signed | None = None
        try:
            # Which batch this is, in the metadata: the home may verify it as it arrives.
            hint = Hint(period, seq, kind).metadata()
            call = self._stub(counterparty).ExchangeBatch(
                parts(), timeout=EXCHANGE_TIMEOUT_S, metadata=hint
            )
            async for part in call:
                if part.HasField("ack"):
                    ack = Signed(part.ack.document, part.ack.key_id, part.ack.signature)
                    continue
                verdicts.add(part.verdicts)
                for _, _, _, code, accepted_fen, claimed_fen in verdict_rows(part.verdicts):
                    cut += claimed_fen - accepted_fen
                    listed += 1
                    rejected += code != CAP_EXCEEDED
            if ack is None:
                raise DocumentRefused(f"{counterparty} sent no acknowledgement")
            doc = verify(ack, self._keys_of(counterparty), Purpose.ACK)
            expected = {
                "type": "ack",
                "from": counterparty,
                "to": self._own,
                "period": day,
                "sequence": seq,
                "batch_digest": digest.hexdigest(),
                "lines": totals.lines,
                "verdicts_digest": verdicts.digest.hexdigest(),
            }
            if any(doc.get(k) != v for k, v in expected.items()):
                raise DocumentRefused(
                    f"acknowledgement from {counterparty} does not match the batch"
                )
            accepted = totals.claimed_fen - cut
            if doc.get("accepted_claim_fen") != accepted:
                raise DocumentRefused(f"acknowledgement from {counterparty} does not add up")
            crash.point("batch_sent")
            await asyncio.to_thread(
                store_ack,
                self._db,
                utc_text(self._clock()),
                counterparty,
                day,
                seq,
                kind,
                totals,
                digest.hexdigest(),
                ack,
                accepted,
                verdicts,
                by_operator,
            )
        except grpc.aio.AioRpcError as exc:
            raise _refusal(counterparty, "ExchangeBatch", exc) from exc
        finally:
            verdicts.close()
        crash.point("ack_stored")
        log.info(
            "batch_acknowledged",
            counterparty=counterparty,
            period=day,
            sequence=seq,
            lines=totals.lines,
            rejected=rejected,
        )
        return BatchResult(
            counterparty,
            day,
            seq,
            kind,
            totals.lines,
            totals.claimed_fen,
            accepted,
            rejected,
            listed - rejected,
        )

    # ------------------------------------------------------------ disputes

    async def represent(
        self, counterparty: str, operator_id: str, trip_id: str, corrections: Mapping[str, Any]
    ) -> BatchResult:
        """Send a corrected line for an open dispute, once."""
        seq, period = await asyncio.to_thread(
            self._build_represent, counterparty, operator_id, trip_id, corrections
        )
        crash.point("represent_built")
        return await self.send(counterparty, period, seq)

    def _build_represent(
        self, counterparty: str, operator_id: str, trip_id: str, corrections: Mapping[str, Any]
    ) -> tuple[int, date]:
        return build_represent(
            self.store,
            lambda trip: line_for(trip, self.cfg, self._fares),
            utc_text(self._clock()),
            counterparty,
            operator_id,
            trip_id,
            corrections,
        )

    def resolve(self, counterparty: str, operator_id: str, trip_id: str, note: str) -> None:
        """Close a dispute by hand (after a final rejection, or instead of representing)."""
        resolve(self._db, utc_text(self._clock()), counterparty, operator_id, trip_id, note)

    # ------------------------------------------------------------ day confirmation

    async def confirm(self, counterparty: str, period: date) -> Position:
        """Agree the day's bilateral position with ``counterparty``; equal views are SETTLED.

        A SETTLED day (signed documents, or the previous release's figures) is reported
        without asking anyone; one not ready is refused (``confirm.require_ready``).
        """
        known = await asyncio.to_thread(position, self.store, counterparty, period)
        if known.state == "settled":
            return known
        mine = require_ready(self.store, counterparty, period, self._clock())
        signed = self._signer.sign(
            position_doc(self._own, counterparty, period, mine), Purpose.POSITION
        )
        try:
            reply = await self._stub(counterparty).ConfirmDay(signed_to_wire(signed), timeout=60)
        except grpc.aio.AioRpcError as exc:
            raise _refusal(counterparty, "ConfirmDay", exc) from exc
        answer = Signed(reply.document, reply.key_id, reply.signature)
        theirs = verify(answer, self._keys_of(counterparty), Purpose.POSITION)
        if not addressed(theirs, counterparty, self._own, period):
            raise DocumentRefused(
                f"position from {counterparty} is not about {period} between it and this district"
            )
        if theirs.get("agreed") is not True or not mirrors(theirs, mine):
            return mine
        crash.point("position_agreed")
        await asyncio.to_thread(
            store_settled,
            self._db,
            counterparty,
            period,
            mine,
            SettledDay(signed, answer),
            self._clock(),
        )
        return position(self.store, counterparty, period)


def _refusal(district: str, call: str, exc: grpc.aio.AioRpcError) -> Exception:
    """A failed call as the close reports it: the home's refusal of a state (its reason
    verbatim), or the home not reached."""
    if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
        return SettlementStateError(f"{district} refused {call}: {exc.details()}")
    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:  # e.g. over its batch limits
        return DocumentRefused(f"{district} refused {call}: {exc.details()}")
    return PeerUnavailable(district, f"{call}: {exc.code().name} {exc.details()}")
