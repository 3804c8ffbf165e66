"""A peer's request_id is replaced unless it is a W3C trace-id, and never echoed (issue 11, item 4).

Real peer calls over mutual TLS (Anyue's node certificate calling Dazu's node), with the
nodes' logging configured as ``broker serve --log-level debug --log-json`` does, and every
line written to stdout and stderr read back: an ID number planted as ``request_id`` is
answered, and appears in no line.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from datetime import date, datetime
from typing import Any, TextIO, cast

import pytest
import structlog

from broker._proto.yikatong.v1 import recognition_pb2, types_pb2
from broker.cards.gb11643 import parse_ssn
from broker.cards.model import CardRef, Scene, shanghai_day
from broker.node import logs
from broker.node.fields import is_trace_id
from tests.conftest import ANYUE, DAZU, Cluster
from tests.helpers import node_channel, recognition_stub, ssn_for

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def id_number() -> str:
    """A valid GB 11643 ID number of 18 digits (no X check character)."""
    for seq in range(1000):
        ssn = ssn_for(DAZU, "19560312", f"{seq:03d}")
        if ssn.isdigit():
            parse_ssn(ssn, date(2026, 1, 1))
            return ssn
    raise AssertionError("unreachable: one in eleven check characters is X")


class CurrentStderr:
    """``sys.stderr`` as it is when written to, not as it was when logging was set up."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


Lines = Callable[[], tuple[list[str], list[dict[str, Any]]]]


@pytest.fixture
def debug_json(capfd: pytest.CaptureFixture[str]) -> Iterator[Lines]:
    """The nodes log at debug, as JSON lines, to the captured stderr; restored after.

    Yields a function returning every line written to stdout and stderr so far, and
    the JSON events among them.
    """
    saved = structlog.get_config()
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    logs.configure("debug", json=True)
    # pytest swaps sys.stderr between a test's phases: write to the one of the moment.
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, CurrentStderr()))
    )

    def read() -> tuple[list[str], list[dict[str, Any]]]:
        out, err = capfd.readouterr()
        lines = (out + err).splitlines()
        return lines, [json.loads(line) for line in lines if line.startswith("{")]

    try:
        yield read
    finally:
        structlog.reset_defaults()
        structlog.configure(**saved)
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def active_card(cluster: Cluster, now: datetime) -> CardRef:
    today = shanghai_day(now)
    card = next(
        c for c in cluster.setups[DAZU].cards if c.status == "active" and c.valid_until >= today
    )
    return card.ref


async def recognize_as_peer(cluster: Cluster, ref: CardRef, request_id: str) -> Any:
    """Ask Dazu's node about ``ref`` as Anyue's node, over mutual TLS."""
    ch = node_channel(cluster.nodes[DAZU].address, cluster.setups[DAZU], cluster.setups[ANYUE])
    try:
        return await recognition_stub(ch).Recognize(
            recognition_pb2.RecognizeRequest(
                card=types_pb2.CardRef(
                    issuer_region=ref.issuer_region, card_number=ref.card_number
                ),
                scene=types_pb2.SCENE_BUS,
                request_id=request_id,
            ),
            timeout=10,
        )
    finally:
        await ch.close()


async def test_an_id_number_sent_as_request_id_is_answered_and_in_no_log_line(
    cluster: Cluster, now: datetime, debug_json: Lines
) -> None:
    planted = id_number()
    assert len(planted) == 18
    answer = await recognize_as_peer(cluster, active_card(cluster, now), planted)
    assert answer.status == types_pb2.CARD_STATUS_ACTIVE  # answered, not refused
    lines, events = debug_json()
    (event,) = [e for e in events if e["event"] == "recognized"]
    assert event["level"] == "debug"  # the premise: debug lines were written
    assert event["request_id_replaced"] == "malformed"
    assert is_trace_id(event["request_id"])
    assert [line for line in lines if planted in line] == []
    assert [line for line in lines if planted[:14] in line] == []  # nor its birth-date part


async def test_a_valid_trace_id_is_passed_through(
    cluster: Cluster, now: datetime, debug_json: Lines
) -> None:
    answer = await recognize_as_peer(cluster, active_card(cluster, now), TRACE_ID)
    assert answer.status == types_pb2.CARD_STATUS_ACTIVE
    _, events = debug_json()
    (event,) = [e for e in events if e["event"] == "recognized"]
    assert (event["request_id"], event["request_id_replaced"]) == (TRACE_ID, None)


async def test_a_node_asking_its_peer_sends_a_trace_id_it_generated(
    cluster: Cluster, now: datetime, debug_json: Lines
) -> None:
    """A gate check at Anyue of a Dazu card: Dazu is asked with a trace-id it keeps."""
    gate = cluster.gate(ANYUE)
    ref = active_card(cluster, now)
    first = await gate.check(ref, Scene.BUS)
    assert first.allow
    other = next(c.ref for c in cluster.setups[DAZU].cards if c.ref != ref)
    await gate.check(other, Scene.BUS)
    _, events = debug_json()
    asked = [e for e in events if e["event"] == "recognized"]
    assert len(asked) == 2  # one peer call per card
    assert all(e["request_id_replaced"] is None for e in asked)
    assert all(is_trace_id(e["request_id"]) for e in asked)
    assert asked[0]["request_id"] != asked[1]["request_id"]
