"""Ledger rows straight to the chunks of a close batch, without a Trip or a message per line.

A close sends every accepted trip of a day to its home district: a million lines
or more, each of which :func:`broker.settlement.clearing.sender.line_for` turns
into a :class:`Line` and :func:`broker.settlement.clearing.batch.encode_lines`
into a ``BatchLine``. :class:`RowEncoder` writes the same bytes from the stored
row directly: the fields in number order, each omitted at its default, as
protobuf's deterministic serialization of proto3 does; the parts that repeat
from line to line (operator, card, place, fare version, scheme, claim) are
worked out once. The result is byte for byte what the slower path gives
(tests/settlement/clearing/test_rows.py compares the two), so a batch sent again
after a crash, by either, has the digest the home district stored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from broker.cards.model import CardRef, DecisionSource, Entitlement, Scene
from broker.fares.agreements import Agreement
from broker.fares.rules import FareSchedule
from broker.settlement.clearing.batch import CHUNK_LINES, Line, Totals
from broker.settlement.clearing.verify import claim
from broker.settlement.ledger.common import gate_and_source
from broker.settlement.statements import scheme_of
from broker.settlement.trips import Trip

# Scheme of a ledger trip by (fare version, operator, scene, place, entitlement).
SchemeOf = Callable[[str, str, Scene, str, Entitlement | None], str]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MASK = (1 << 64) - 1


def scheme_by(fares: FareSchedule | None) -> SchemeOf:
    """:func:`broker.settlement.statements.scheme_of` by the fields it reads ("" for none)."""
    card = CardRef("", "")

    def of(
        version: str, operator: str, scene: Scene, place: str, entitlement: Entitlement | None
    ) -> str:
        trip = Trip(operator, "", card, scene, place, _EPOCH, 0, 0, 0, entitlement, version)
        return scheme_of(trip, fares) or ""

    return of


_SMALL = [bytes((i,)) for i in range(0x80)]
# Field 15, decision_source, by its value (a stored value is one DecisionSource knows).
_SOURCE_FIELDS = {s.value: b"\x78" + _SMALL[s.value] for s in DecisionSource}


def varint(value: int) -> bytes:
    """A protobuf varint; a negative int64 as its 64-bit two's complement (ten bytes)."""
    if 0 <= value < 0x80:
        return _SMALL[value]
    value &= _MASK
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _text(tag: int, value: str) -> bytes:
    if not value:
        return b""
    data = value.encode()
    return bytes((tag,)) + varint(len(data)) + data


def _number(tag: int, value: int) -> bytes:
    return bytes((tag,)) + varint(value) if value else b""


class RowEncoder:
    """Rows of ``TRIP_COLUMNS`` as ``BatchLine`` bytes, with their amounts and operator."""

    def __init__(self, scheme_of: SchemeOf, agreement: Callable[[str], Agreement | None]) -> None:
        self._scheme_of = scheme_of
        self._agreement = agreement
        self._texts: dict[tuple[int, str], bytes] = {}
        self._cards: dict[tuple[str, str], bytes] = {}
        # (version, operator, scene, place, entitlement) → the scheme and the fields by them
        self._schemes: dict[tuple[Any, ...], tuple[str, bytes, bytes, bytes]] = {}
        self._amount_fields: dict[tuple[int, int, int, int], bytes] = {}
        self._claims: dict[tuple[str, int, int, str], int] = {}
        self._agreements: dict[str, Agreement | None] = {}

    def _cached_text(self, tag: int, value: str) -> bytes:
        key = (tag, value)
        found = self._texts.get(key)
        if found is None:
            if len(self._texts) > 100_000:
                self._texts.clear()
            found = self._texts[key] = _text(tag, value)
        return found

    def _card(self, region: str, number: str) -> bytes:
        key = (region, number)
        found = self._cards.get(key)
        if found is None:
            if len(self._cards) > 100_000:
                self._cards.clear()
            body = _text(0x0A, region) + _text(0x12, number)
            found = self._cards[key] = b"\x1a" + varint(len(body)) + body
        return found

    def _claim(self, region: str, charged: int, concession: int, scheme: str) -> int:
        key = (region, charged, concession, scheme)
        found = self._claims.get(key)
        if found is None:
            if region not in self._agreements:
                self._agreements[region] = self._agreement(region)
            found = claim(self._agreements[region], charged, concession, scheme)
            if len(self._claims) > 100_000:
                self._claims.clear()
            self._claims[key] = found
        return found

    def _amounts(self, gross: int, charged: int, concession: int, entitlement: int) -> bytes:
        """Fields 7-10 (gross, charged, concession, entitlement): few combinations repeat."""
        key = (gross, charged, concession, entitlement)
        found = self._amount_fields.get(key)
        if found is None:
            if len(self._amount_fields) > 100_000:
                self._amount_fields.clear()
            found = self._amount_fields[key] = (
                _number(0x38, gross)
                + _number(0x40, charged)
                + _number(0x48, concession)
                + _number(0x50, entitlement)
            )
        return found

    def encode(self, row: tuple[Any, ...]) -> tuple[bytes, str, int, int, int, int]:
        """``(BatchLine bytes, operator, gross, charged, concession, claimed)`` of a row."""
        operator, trip_id, region, number, scene_value, place = row[:6]
        occurred = row[6]
        if isinstance(occurred, str):
            occurred = datetime.fromisoformat(occurred)
        occurred = occurred.astimezone(UTC)
        gross, charged, concession = int(row[7]), int(row[8]), int(row[9])
        entitlement_value, version = row[10], row[11]
        gate, source = gate_and_source(row[12])
        key = (version, operator, scene_value, place, entitlement_value)
        found = self._schemes.get(key)
        if found is None:
            scene = Scene(scene_value)
            entitlement = Entitlement(entitlement_value) if entitlement_value else None
            scheme = self._scheme_of(version, operator, scene, place, entitlement)
            head = self._cached_text(0x0A, operator)
            middle = _number(0x20, scene.value) + self._cached_text(0x2A, place)
            tail = self._cached_text(0x5A, version) + _text(0x62, scheme)
            found = self._schemes[key] = (scheme, head, middle, tail)
        scheme, head, middle, tail = found
        claimed = self._claim(region, charged, concession, scheme)
        delta = occurred - _EPOCH
        seconds = delta.days * 86_400 + delta.seconds
        stamp = (b"\x08" + varint(seconds) if seconds else b"") + (
            b"\x10" + varint(occurred.microsecond * 1000) if occurred.microsecond else b""
        )
        trip = trip_id.encode()
        body = b"".join(
            (
                head,
                b"\x12" + varint(len(trip)) + trip if trip else b"",
                self._card(region, number),
                middle,
                b"\x32" + varint(len(stamp)) + stamp,
                self._amounts(gross, charged, concession, entitlement_value or 0),
                tail,
                _number(0x68, claimed),
                self._cached_text(0x72, gate),
                _SOURCE_FIELDS[source] if source else b"",
            )
        )
        return body, operator, gross, charged, concession, claimed


def row_chunks(
    blocks: Iterable[list[tuple[Any, ...]]],
    encoder: RowEncoder,
    totals: Totals,
    by_operator: dict[str, tuple[int, int]],
    size: int = CHUNK_LINES,
) -> Iterator[tuple[bytes, int]]:
    """``(BatchLines bytes, lines in it)`` of ``size`` rows at a time, as
    :func:`broker.settlement.clearing.batch.chunked` cuts them; ``totals`` and
    ``by_operator`` (lines and claim per operator) count each chunk's lines before it
    is given."""
    parts: list[bytes] = []
    sums = [0, 0, 0, 0]  # gross, charged, concession, claimed of the lines in ``parts``
    counts: dict[str, list[int]] = {}  # operator → [lines, claim] in ``parts``

    def counted() -> tuple[bytes, int]:
        totals.lines += len(parts)
        totals.gross_fen += sums[0]
        totals.charged_fen += sums[1]
        totals.concession_fen += sums[2]
        totals.claimed_fen += sums[3]
        for operator, (lines, claimed) in counts.items():
            n, c = by_operator.get(operator, (0, 0))
            by_operator[operator] = (n + lines, c + claimed)
        chunk = (b"".join(parts), len(parts))
        parts.clear()
        sums[:] = [0, 0, 0, 0]
        counts.clear()
        return chunk

    for block in blocks:
        for row in block:
            body, operator, gross, charged, concession, claimed = encoder.encode(row)
            parts.append(b"\x0a" + varint(len(body)) + body)
            sums[0] += gross
            sums[1] += charged
            sums[2] += concession
            sums[3] += claimed
            per = counts.get(operator)
            if per is None:
                per = counts[operator] = [0, 0]
            per[0] += 1
            per[1] += claimed
            if len(parts) == size:
                yield counted()
    if parts:
        yield counted()


def counting(
    lines: Iterator[Line], totals: Totals, by_operator: dict[str, tuple[int, int]]
) -> Iterator[Line]:
    """``lines``, each counted into ``totals`` and ``by_operator`` (lines and claim per
    operator) as it passes (the path of lines that are not ledger rows: representments)."""
    for line in lines:
        totals.add(line)
        n, claimed = by_operator.get(line.trip.operator_id, (0, 0))
        by_operator[line.trip.operator_id] = (n + 1, claimed + line.claimed_fen)
        yield line
