"""Status updates (broker.cards.updates) as they cross the wire both ways, read defensively."""

from __future__ import annotations

import pytest

from broker._proto.yikatong.v1 import recognition_pb2, types_pb2
from broker.cards.model import CardStatus, LogPosition
from broker.cards.updates import Change, Progress, Rewind, Update
from broker.cards.wire import update_from_wire, update_to_wire
from broker.core.errors import InvalidArgument

AT = LogPosition("ab" * 16, 7, "cd" * 16)


@pytest.mark.parametrize(
    "update",
    [
        Change(AT, "0f" * 16, CardStatus.LOST),
        Change(AT, "0f" * 16, CardStatus.ACTIVE),
        Progress(AT),
        Rewind(LogPosition("ab" * 16, 0, "")),
    ],
)
def test_an_update_reads_back_as_it_was_sent(update: Update):
    assert update_from_wire(update_to_wire(update)) == update


def odd(change: recognition_pb2.StatusChange) -> recognition_pb2.StatusUpdate:
    return recognition_pb2.StatusUpdate(change=change)


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (recognition_pb2.StatusUpdate(), "update"),
        (odd(recognition_pb2.StatusChange(handle="0F" * 16)), "change.handle"),
        (odd(recognition_pb2.StatusChange(handle="0f" * 15)), "change.handle"),
        (odd(recognition_pb2.StatusChange(handle="0f" * 16)), "change.position.epoch"),
        (recognition_pb2.StatusUpdate(progress=recognition_pb2.LogPosition(epoch="ab", seq=2)),
         "progress.mark"),
    ],
)  # fmt: skip
def test_an_update_that_does_not_read_names_its_field(
    message: recognition_pb2.StatusUpdate, field: str
):
    with pytest.raises(InvalidArgument) as info:
        update_from_wire(message)
    assert info.value.field == field


def test_a_status_this_release_does_not_know_is_only_ask_again():
    """A newer home may send a status we do not know: never taken as a refusal or as valid
    entitlements, only as "ask the home again"."""
    message = update_to_wire(Change(AT, "0f" * 16, CardStatus.LOST))
    message.change.status = 99  # type: ignore[assignment]
    got = update_from_wire(message)
    assert isinstance(got, Change) and got.status is CardStatus.ACTIVE
    assert CardStatus.LOST.value == types_pb2.CARD_STATUS_LOST
