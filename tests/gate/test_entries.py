"""Cache entries (broker/gate/entries.py): which write may replace which."""

from __future__ import annotations

import pytest

from broker.cards.model import CardStatus, Entitlement, Recognition
from broker.gate.entries import Entry, may_replace

ACTIVE = Recognition(CardStatus.ACTIVE, (Entitlement.SENIOR_60, Entitlement.DISABLED), 120)


@pytest.mark.parametrize(
    ("new", "old", "replaces"),
    [
        (Entry(ACTIVE, "e1", 5), None, True),
        (Entry(ACTIVE, "e1", 5), Entry(None, "e1", 6), False),  # a later push wins
        (Entry(ACTIVE, "e1", 6), Entry(None, "e1", 6), True),  # read after it: shows it
        (Entry(ACTIVE, "e1", 7), Entry(None, "e1", 6), True),
        (Entry(ACTIVE), Entry(None, "e1", 6), False),  # no position cannot undo a push
        (Entry(ACTIVE), Entry(ACTIVE), True),
        (Entry(ACTIVE, "e2", 1), Entry(None, "e1", 6), True),  # a reset log: the later write
    ],
)
def test_which_write_may_replace_which(new: Entry, old: Entry | None, replaces: bool):
    assert may_replace(new, old) is replaces
