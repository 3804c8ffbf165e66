"""Setting a card's status at home: the change, its history and its event, all or nothing."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

import pytest

from broker.cards import status_log
from broker.cards.config import RegistryConfig
from broker.cards.csv_import import CardRow
from broker.cards.model import CardStatus, LogPosition
from broker.cards.registry import Registry
from broker.cards.status_change import parse_card_numbers, set_status
from broker.core.errors import InvalidArgument
from tests.helpers import refuse_rows

RegistryAt = Callable[..., RegistryConfig]
T0 = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)


def row(number: str, status: str = "active", valid_until: date = date(2030, 1, 1)) -> CardRow:
    return CardRow(number, "h" * 32, date(1950, 1, 1), status, False, False, valid_until)


@pytest.fixture
def reg(registry_at: RegistryAt):
    r = Registry(registry_at())
    r.upsert([row("A1"), row("A2"), row("A3", valid_until=date(2026, 1, 31))], T0)
    yield r
    r.close()


def logged(reg: Registry, after: int) -> list[tuple[int, str, CardStatus]]:
    epoch = status_log.head(reg.db).epoch
    got = status_log.read(reg.db, LogPosition(epoch, 0, ""))
    assert isinstance(got, list)
    return [(e.seq, e.card_number, e.status) for e in got if e.seq > after]


def test_a_card_reported_lost_is_lost_from_when_it_was_reported(reg: Registry):
    head = status_log.head(reg.db).seq
    reported = T0 + timedelta(hours=1)
    now = T0 + timedelta(hours=2)
    result = set_status(reg, ["A1"], "lost", now, changed_at=reported)
    assert (result.changed, result.unchanged, result.unknown) == (1, 0, ())
    assert result.first_seq == result.last_seq == head + 1
    found = reg.lookup("A1")
    assert found is not None and found.status == "lost"
    assert logged(reg, head) == [(head + 1, "A1", CardStatus.LOST)]
    assert reg.status_at("A1", now) is CardStatus.LOST
    # recorded at ``now``: before it, the home could still have answered ACTIVE
    assert reg.status_at("A1", reported + timedelta(minutes=30)) is CardStatus.ACTIVE
    assert reg.lookup("A2") is not None and reg.lookup("A2").status == "active"  # type: ignore[union-attr]


def test_a_card_already_so_records_nothing_and_unknown_ones_are_named_by_position(
    reg: Registry,
):
    set_status(reg, ["A1"], "suspended", T0 + timedelta(hours=1))
    head = status_log.head(reg.db).seq
    result = set_status(reg, ["NOPE1", "A1", "A2", "A2", "NOPE2"], "suspended", T0 + timedelta(2))
    assert (result.changed, result.unchanged, result.unknown) == (1, 2, (1, 5))
    assert logged(reg, head) == [(head + 1, "A2", CardStatus.SUSPENDED)]


def test_active_again_only_invalidates_and_an_expired_card_stays_refused(reg: Registry):
    set_status(reg, ["A1", "A3"], "lost", T0 + timedelta(hours=1))
    head = status_log.head(reg.db).seq
    set_status(reg, ["A1", "A3"], "active", T0 + timedelta(hours=2))
    [(_, _, a1), (_, _, a3)] = logged(reg, head)
    assert a1 is CardStatus.ACTIVE  # an invalidation: the next check asks the home
    assert a3 is CardStatus.EXPIRED  # valid until 2026-01-31: active again is still refused


def test_the_change_and_its_event_commit_together_or_not_at_all(reg: Registry):
    """A failure in the middle (here the database refusing the second card's event) leaves
    every card as it was, no history row and no event: the log never tells of a change the
    registry does not have, nor misses one it has."""
    refused = refuse_rows(reg.db, "status_events", "card_number", "A2")
    head = status_log.head(reg.db)
    history = reg.history("A1")
    with pytest.raises(refused):
        set_status(reg, ["A1", "A2"], "lost", T0 + timedelta(hours=1))
    assert reg.lookup("A1").status == "active"  # type: ignore[union-attr]
    assert reg.history("A1") == history
    assert status_log.head(reg.db) == head


@pytest.mark.parametrize(
    ("status", "changed_at", "field"),
    [
        ("stolen", None, "status"),
        ("lost", T0 + timedelta(hours=1), "changed_at"),  # after now: in the future
        ("lost", datetime(2026, 3, 1, 1, 0), "changed_at"),  # no time zone
    ],
)
def test_odd_requests_are_refused_naming_the_field(
    reg: Registry, status: str, changed_at: datetime | None, field: str
):
    head = status_log.head(reg.db)
    with pytest.raises(InvalidArgument) as info:
        set_status(reg, ["A1"], status, T0, changed_at=changed_at)
    assert info.value.field == field
    assert status_log.head(reg.db) == head


def test_card_numbers_are_read_one_per_line_without_blanks_or_comments():
    text = "A1\n\n  A2  \n# the lost ones of Monday\nA3 # at the counter\n"
    assert parse_card_numbers(text) == ["A1", "A2", "A3"]
