"""Report a card lost, suspend it, or make it active again: the back office's one change.

:func:`set_status` changes the listed cards in one transaction, each with its
history row and its event in the status log (:mod:`broker.cards.status_log`),
so a peer that asked about a card learns of the change as soon as it commits.
Card numbers come in as data (a file, stdin, a request), never on a command
line: shell history and ``/proc/<pid>/cmdline`` keep those.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Final

from broker.cards import status_log
from broker.cards.model import shanghai_day
from broker.cards.registry import Registry, derive_status, insert_status_row
from broker.core.db import utc_text
from broker.core.errors import InvalidArgument

SETTABLE: Final = ("lost", "suspended", "active")
# A back office's clock may run a little ahead of ours; a change dated later than this
# ahead is refused rather than recorded as taking effect in the future.
CLOCK_SKEW: Final = timedelta(minutes=5)


@dataclass(frozen=True)
class StatusChangeResult:
    """What :func:`set_status` did; ``unknown`` are 1-based positions in the input (never
    the numbers themselves: the caller has them, and they stay out of output and logs)."""

    changed: int
    unchanged: int
    unknown: tuple[int, ...]
    first_seq: int | None
    last_seq: int | None


def parse_card_numbers(text: str) -> list[str]:
    """One card number per line; blank lines and ``#`` comments are skipped, spaces trimmed."""
    out = []
    for line in text.splitlines():
        number = line.split("#", 1)[0].strip()
        if number:
            out.append(number)
    return out


def set_status(
    registry: Registry,
    card_numbers: Sequence[str],
    status: str,
    now: datetime,
    changed_at: datetime | None = None,
) -> StatusChangeResult:
    """Set ``status`` on every listed card of this district, all or nothing.

    ``changed_at`` is when the change took effect (a loss: when it was
    reported), ``now`` when it is recorded here; a card already in that
    status is left as it is (no history row, no event). Unknown cards
    change nothing and are reported by position.
    """
    if status not in SETTABLE:
        raise InvalidArgument("status", f"must be one of {', '.join(SETTABLE)}")
    effective = changed_at or now
    if effective.tzinfo is None:
        raise InvalidArgument("changed_at", "must carry a time zone")
    if effective > now + CLOCK_SKEW:
        raise InvalidArgument("changed_at", "is in the future")
    db = registry.db
    recorded, changed = utc_text(now), utc_text(effective)
    done = unchanged = 0
    unknown: list[int] = []
    seqs: list[int] = []
    with db.write():
        for position, number in enumerate(card_numbers, start=1):
            row = db.one(
                "SELECT status, valid_until, disabled, student FROM cards WHERE card_number = ?",
                (number,),
            )
            if row is None:
                unknown.append(position)
                continue
            if row[0] == status:  # already so (or listed twice): nothing to record
                unchanged += 1
                continue
            db.execute(
                "UPDATE cards SET status = ?, updated_at = ? WHERE card_number = ?",
                (status, recorded, number),
            )
            previous_release_row = insert_status_row(db, number, status, row[1], changed)
            db.execute(
                "INSERT INTO card_history (card_number, status, valid_until, disabled, student, "
                "changed_at, recorded_at, status_history_id, imported_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    number,
                    status,
                    row[1],
                    row[2],
                    row[3],
                    changed,
                    recorded,
                    previous_release_row,
                    recorded,
                ),
            )
            wire = derive_status(status, date.fromisoformat(row[1]), shanghai_day(now))
            seqs.append(status_log.append(db, number, wire, effective, now, now))
            done += 1
        if seqs:
            status_log.announce(db)
    return StatusChangeResult(
        done, unchanged, tuple(unknown), seqs[0] if seqs else None, seqs[-1] if seqs else None
    )
