"""Parsing and validating a card-holder import file.

The file is CSV with the header ``card_number,ssn,status,disabled,student,valid_until``,
and optionally ``changed_at`` and ``recorded_at``: when the row's change took
effect (a loss: when it was reported) and when the home district's back office
recorded it, as ISO 8601 instants with a UTC offset. The back office sends them
so that every replica keeps the same history; an empty or absent value is
filled in by :meth:`broker.cards.registry.Registry.upsert`. The file is accepted
whole or refused whole: every bad row is reported with its line number and
reason, and nothing is written. Reasons never repeat a card number or an ID
number.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime

from broker.cards.gb11643 import parse_ssn
from broker.cards.model import shanghai_day, validate_card_number
from broker.cards.privacy import Hasher
from broker.core.errors import ImportRejected, InvalidArgument, RowError

COLUMNS = ("card_number", "ssn", "status", "disabled", "student", "valid_until")
STATUSES = ("active", "lost", "suspended")
_FLAGS = {"true": True, "false": False}


@dataclass(frozen=True, slots=True)
class CardRow:
    """One validated card-holder row, the ID number already replaced by its keyed hash.

    ``changed_at`` and ``recorded_at`` are the back office's instants, when given
    (see the module docstring); ``None`` leaves them to the import.
    """

    card_number: str
    holder_key: str
    birth_date: date
    status: str
    disabled: bool
    student: bool
    valid_until: date
    changed_at: datetime | None = None
    recorded_at: datetime | None = None

    def __repr__(self) -> str:
        return f"CardRow(card_number=<redacted>, status={self.status!r})"


def _flag(value: str, name: str) -> bool:
    try:
        return _FLAGS[value.strip().lower()]
    except KeyError:
        raise ValueError(f"{name} must be true or false") from None


def _instant(raw: dict[str, str], name: str, today: date) -> datetime | None:
    value = (raw.get(name) or "").strip()
    if not value:
        return None
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{name} must be an ISO 8601 instant with a UTC offset") from None
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"{name} has no UTC offset: write it as e.g. 2026-03-10T10:00:00+08:00")
    if shanghai_day(at) > today:
        raise ValueError(f"{name} is in the future ({value}): refused")
    return at


def parse_row(raw: dict[str, str], today: date, hasher: Hasher) -> CardRow:
    """Validate one row; raise ``ValueError`` naming the first bad field."""
    try:
        number = validate_card_number(raw["card_number"].strip(), "card_number")
    except InvalidArgument as exc:
        raise ValueError(str(exc)) from None
    ssn = raw["ssn"].strip().upper()
    born = parse_ssn(ssn, today)
    status = raw["status"].strip().lower()
    if status not in STATUSES:
        raise ValueError(f"status must be one of {'|'.join(STATUSES)}")
    try:
        valid_until = date.fromisoformat(raw["valid_until"].strip())
    except ValueError:
        raise ValueError("valid_until must be an ISO date (YYYY-MM-DD)") from None
    return CardRow(
        card_number=number,
        holder_key=hasher.holder_key(ssn),
        birth_date=born,
        status=status,
        disabled=_flag(raw["disabled"], "disabled"),
        student=_flag(raw["student"], "student"),
        valid_until=valid_until,
        changed_at=_instant(raw, "changed_at", today),
        recorded_at=_instant(raw, "recorded_at", today),
    )


def parse_import(lines: Iterable[str], today: date, hasher: Hasher) -> list[CardRow]:
    """Parse a whole import file.

    Args:
        lines: the file's lines (an open text file will do).
        today: the day birth dates are checked against (Asia/Shanghai).
        hasher: replaces each ID number by its keyed hash.

    Raises:
        ImportRejected: with every bad row, when any row is bad.
    """
    reader = csv.DictReader(lines)
    header = tuple(h.strip() for h in (reader.fieldnames or ()))
    reader.fieldnames = list(header)
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise ImportRejected([RowError(1, f"header lacks column(s): {', '.join(missing)}")])
    rows: list[CardRow] = []
    errors: list[RowError] = []
    first_line: dict[str, int] = {}
    for raw in reader:
        line = reader.line_num
        if None in raw or any(raw.get(c) is None for c in COLUMNS):
            errors.append(RowError(line, f"expected {len(header)} fields"))
            continue
        try:
            row = parse_row(raw, today, hasher)
        except ValueError as exc:
            errors.append(RowError(line, str(exc)))
            continue
        if row.card_number in first_line:
            errors.append(
                RowError(line, f"card_number repeats the one on line {first_line[row.card_number]}")
            )
            continue
        first_line[row.card_number] = line
        rows.append(row)
    if errors:
        raise ImportRejected(errors)
    return rows
