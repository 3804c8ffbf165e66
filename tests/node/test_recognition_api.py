"""Recognition.Recognize's servicer (broker/node/recognition_api.py) through a running node.

tests/e2e/test_gate.py covers the answer's fields, a foreign card and an unknown one; here:
what the servicer itself checks and leaves optional, what it does with a peer's request_id
(a W3C trace-id is kept; anything else is replaced and counted, never refused or logged),
and what it logs about the call. tests/e2e/test_request_ids.py plants an ID number.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, MutableMapping
from datetime import datetime
from typing import Any

import grpc
import pytest
import structlog
from cryptography import x509
from structlog.testing import capture_logs

from broker._proto.yikatong.v1 import recognition_pb2, recognition_pb2_grpc, types_pb2
from broker.cards.entitlements import entitlements_for
from broker.cards.handles import live_handles, open_handles
from broker.cards.model import shanghai_day
from broker.cards.privacy import load_key_file
from broker.cards.status_change import set_status
from broker.gate.home import HomeRecognizer
from broker.node.fields import is_trace_id
from broker.node.recognition_api import RecognitionServicer
from broker.testbed.build import SyntheticCard
from broker.trust import certops
from broker.trust.identity import bind_identity, node_identity, unbind_identity
from tests.conftest import ANYUE, DAZU, RONGCHANG, Cluster
from tests.helpers import node_channel


def active_card(cluster: Cluster, now: datetime) -> SyntheticCard:
    today = shanghai_day(now)
    return next(
        c
        for c in cluster.setups[DAZU].cards
        if c.status == "active" and c.valid_until >= today and (c.disabled or c.student)
    )


def request(card: SyntheticCard, scene: int = 0, request_id: str = "") -> Any:
    return recognition_pb2.RecognizeRequest(
        card=types_pb2.CardRef(
            issuer_region=card.ref.issuer_region, card_number=card.ref.card_number
        ),
        scene=scene,  # type: ignore[arg-type]
        request_id=request_id,
    )


async def recognize(
    cluster: Cluster, req: recognition_pb2.RecognizeRequest
) -> recognition_pb2.RecognizeResponse | grpc.aio.AioRpcError:
    """Ask Dazu's node as Anyue's node (a configured peer); the answer, or the error."""
    ch = node_channel(cluster.nodes[DAZU].address, cluster.setups[DAZU], cluster.setups[ANYUE])
    try:
        return await recognition_pb2_grpc.RecognitionStub(ch).Recognize(req, timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc
    finally:
        await ch.close()


@pytest.fixture
def debug_logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """Every event (debug too) logged while the test runs; the logging setup restored after."""
    saved = structlog.get_config()
    structlog.reset_defaults()
    try:
        with capture_logs() as events:
            yield events
    finally:
        structlog.reset_defaults()
        structlog.configure(**saved)


async def test_scene_and_request_id_are_optional_for_a_peer(
    cluster: Cluster, now: datetime
) -> None:
    """Unlike a gate check, a peer need not say where the card is used."""
    card = active_card(cluster, now)
    answer = await recognize(cluster, request(card))
    assert isinstance(answer, recognition_pb2.RecognizeResponse)
    assert answer.status == types_pb2.CARD_STATUS_ACTIVE
    held = entitlements_for(card.birth_date, card.disabled, card.student, shanghai_day(now))
    assert held and list(answer.entitlements) == [e.value for e in held]
    with_both = await recognize(cluster, request(card, types_pb2.SCENE_MUSEUM, "r" * 64))
    assert with_both == answer


MALFORMED: list[tuple[Callable[[recognition_pb2.RecognizeRequest], object], str]] = [
    (lambda r: r.ClearField("card"), "card"),
    (lambda r: setattr(r, "scene", 99), "scene"),
]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
NOT_TRACE_IDS = {"": "empty", "r" * 65: "oversized", "req\n1": "malformed", "req-42": "malformed"}


async def test_a_malformed_request_is_invalid_argument_naming_the_field(
    cluster: Cluster, now: datetime
) -> None:
    card = active_card(cluster, now)
    for change, field in MALFORMED:  # one node for every case
        req = request(card, types_pb2.SCENE_BUS, "t-1")
        change(req)
        err = await recognize(cluster, req)
        assert isinstance(err, grpc.aio.AioRpcError), field
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert (err.details() or "").startswith(field + ":"), err.details()


async def test_the_call_is_logged_with_the_caller_and_a_keyed_hash_never_the_card_number(
    cluster: Cluster, now: datetime, debug_logs: list[MutableMapping[str, Any]]
) -> None:
    card = active_card(cluster, now)
    answer = await recognize(cluster, request(card, types_pb2.SCENE_BUS, TRACE_ID))
    assert isinstance(answer, recognition_pb2.RecognizeResponse)
    (event,) = [e for e in debug_logs if e["event"] == "recognized"]
    hasher = load_key_file(cluster.setups[DAZU].paths.hash_key)
    assert event["caller"] == f"spiffe://{ANYUE}.yikatong.cy/node"
    assert event["card"] == hasher.card_key(card.ref)
    assert (event["status"], event["request_id"]) == ("ACTIVE", TRACE_ID)
    assert event["request_id_replaced"] is None
    assert card.ref.card_number not in repr(debug_logs)


async def test_a_request_id_that_is_not_a_trace_id_is_answered_and_logged_as_a_new_one(
    cluster: Cluster, now: datetime, debug_logs: list[MutableMapping[str, Any]]
) -> None:
    """Never refused, so another district's client keeps working; never echoed into our logs."""
    card = active_card(cluster, now)
    for bad in NOT_TRACE_IDS:
        answer = await recognize(cluster, request(card, types_pb2.SCENE_BUS, bad))
        assert isinstance(answer, recognition_pb2.RecognizeResponse), repr(bad)
        assert answer.status == types_pb2.CARD_STATUS_ACTIVE
    events = [e for e in debug_logs if e["event"] == "recognized"]
    assert [e["request_id_replaced"] for e in events] == list(NOT_TRACE_IDS.values())
    assert all(is_trace_id(e["request_id"]) for e in events)
    assert len({e["request_id"] for e in events}) == len(events)  # a new one each time
    text = repr(debug_logs)
    assert "req-42" not in text and "r" * 65 not in text and "req\\n1" not in text


async def test_replaced_request_ids_are_counted_by_reason(cluster: Cluster, now: datetime) -> None:
    node = cluster.nodes[DAZU]
    home = HomeRecognizer(DAZU, node.registry, node.config.recognition)
    hasher = load_key_file(cluster.setups[DAZU].paths.hash_key)
    servicer = RecognitionServicer(home, hasher, lambda: now)
    card = active_card(cluster, now)
    context: Any = None  # the servicer reads nothing from it
    token = bind_identity(node_identity(ANYUE))  # as the guard does
    try:
        for request_id in [TRACE_ID, *NOT_TRACE_IDS, "req-43"]:
            answer = await servicer.Recognize(request(card, 0, request_id), context)
            assert answer.status == types_pb2.CARD_STATUS_ACTIVE
    finally:
        unbind_identity(token)
    assert servicer.request_ids_replaced == {"empty": 1, "oversized": 1, "malformed": 3}


# ---------------------------------------------------------------- pushed status changes

HANDLE = "ab" * 16


def watch(cluster: Cluster, me: str, after: recognition_pb2.LogPosition | None) -> Any:
    """A WatchStatus stream from Dazu's node, as ``me``'s node; its channel closes with it."""
    ch = node_channel(cluster.nodes[DAZU].address, cluster.setups[DAZU], cluster.setups[me])
    req = recognition_pb2.WatchStatusRequest()
    if after is not None:
        req.after.CopyFrom(after)
    return ch, recognition_pb2_grpc.RecognitionStub(ch).WatchStatus(req, timeout=10)


async def past_greeting(stream: Any, start: recognition_pb2.LogPosition) -> Any:
    """The next update that is not the stream's greeting (progress at its own cursor)."""
    while (update := await stream.read()).WhichOneof("update") == "progress":
        if update.progress != start:
            break
    return update


async def test_a_peer_that_gave_a_handle_is_told_by_it_when_the_card_is_lost(
    cluster: Cluster, now: datetime
) -> None:
    card = active_card(cluster, now)
    req = request(card)
    req.handle = HANDLE
    answer = await recognize(cluster, req)
    assert isinstance(answer, recognition_pb2.RecognizeResponse)
    assert answer.HasField("position") and len(answer.position.epoch) == 32
    ch, stream = watch(cluster, ANYUE, answer.position)
    other_ch, other = watch(cluster, RONGCHANG, answer.position)  # never asked about it
    try:
        set_status(cluster.nodes[DAZU].registry, [card.ref.card_number], "lost", cluster.clock())
        update = await past_greeting(stream, answer.position)
        assert update.WhichOneof("update") == "change"
        assert (update.change.handle, update.change.status) == (HANDLE, types_pb2.CARD_STATUS_LOST)
        assert update.change.position.seq == answer.position.seq + 1
        assert card.ref.card_number not in str(update)
        told = await past_greeting(other, answer.position)
        assert told.WhichOneof("update") == "progress"  # past it, without a word about it
        assert told.progress == update.change.position
    finally:
        stream.cancel()
        other.cancel()
        await ch.close()
        await other_ch.close()
    again = await recognize(cluster, request(card))
    assert isinstance(again, recognition_pb2.RecognizeResponse)
    assert again.status == types_pb2.CARD_STATUS_LOST
    assert again.position.seq == update.change.position.seq  # the answer shows the change


@pytest.mark.parametrize("handle", ["AB" * 16, "ab" * 15, "ab" * 17, "zz" * 16, "ab" * 15 + "\n "])
async def test_a_malformed_handle_is_answered_without_push_and_counted(
    cluster: Cluster, now: datetime, handle: str
) -> None:
    node = cluster.nodes[DAZU]
    servicer = RecognitionServicer(
        HomeRecognizer(DAZU, node.registry, node.config.recognition),
        load_key_file(cluster.setups[DAZU].paths.hash_key),
        lambda: now,
        node.book,
        node.feed,
    )
    card = active_card(cluster, now)
    req = request(card)
    req.handle = handle
    token = bind_identity(node_identity(ANYUE))
    try:
        answer = await servicer.Recognize(req, None)
    finally:
        unbind_identity(token)
    assert answer.status == types_pb2.CARD_STATUS_ACTIVE and answer.cache_ttl_seconds > 0
    assert servicer.handles_refused == 1
    handles = open_handles(node.registry.path)
    try:
        assert live_handles(handles, ANYUE, [card.ref.card_number], now) == {}
    finally:
        handles.close()


async def test_a_watch_without_a_cursor_restarts_at_the_head_and_an_odd_one_is_refused(
    cluster: Cluster,
) -> None:
    ch, stream = watch(cluster, ANYUE, None)
    try:
        first = await stream.read()
        assert first.WhichOneof("update") == "restart"
        assert first.restart.epoch == (await cluster.nodes[DAZU].feed.head()).epoch  # type: ignore[union-attr]
    finally:
        stream.cancel()
        await ch.close()
    for odd, field in [
        (recognition_pb2.LogPosition(epoch="not hex!", seq=1, mark="ab"), "after.epoch"),
        (recognition_pb2.LogPosition(epoch="ab" * 16, seq=3, mark=""), "after.mark"),
    ]:
        ch, stream = watch(cluster, ANYUE, odd)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stream.read()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (info.value.details() or "").startswith(field)
        finally:
            await ch.close()


async def test_a_revoked_peers_watch_is_ended_at_the_next_trust_change(
    cluster: Cluster, now: datetime
) -> None:
    """Anyue's node certificate is revoked by its own CA; Dazu learns it from Anyue's bundle
    (fetched every second here) and ends the stream then, saying why."""
    ch, stream = watch(cluster, ANYUE, None)
    try:
        first = await stream.read()
        assert first.WhichOneof("update") == "restart"
        anyue = cluster.setups[ANYUE].paths
        serial = f"{x509.load_pem_x509_certificate(anyue.node_cert.read_bytes()).serial_number:x}"
        certops.revoke(anyue, serial, now)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while await stream.read() is not grpc.aio.EOF:
                pass  # a clean end would leave the loop, and fail: it must be refused
        assert time.monotonic() - started < 10
        assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "has been revoked" in (ended.value.details() or "")
    finally:
        stream.cancel()
        await ch.close()


async def test_a_handle_that_cannot_be_kept_makes_the_answer_uncacheable(
    cluster: Cluster, now: datetime
) -> None:
    """The home could not promise to push this card's changes: the peer is answered, but
    told not to cache the answer (TTL 0), and the failure is logged once, not per call."""
    handles = open_handles(cluster.nodes[DAZU].registry.path)
    handles.execute(
        "CREATE TRIGGER no_handles BEFORE INSERT ON peer_handles "
        "BEGIN SELECT RAISE(ABORT, 'disk full, say'); END"
    )
    handles.close()
    card = active_card(cluster, now)
    req = request(card)
    req.handle = HANDLE
    with capture_logs() as events:
        first = await recognize(cluster, req)
        second = await recognize(cluster, req)
    for answer in (first, second):
        assert isinstance(answer, recognition_pb2.RecognizeResponse)
        assert answer.status == types_pb2.CARD_STATUS_ACTIVE and answer.cache_ttl_seconds == 0
    assert [e["event"] for e in events if e["event"].startswith("handles_")] == ["handles_not_kept"]
    without = await recognize(cluster, request(card))  # no handle asked for: cached as ever
    assert isinstance(without, recognition_pb2.RecognizeResponse)
    assert without.cache_ttl_seconds > 0
