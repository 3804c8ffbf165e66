"""The home's pushed changes (broker.gate.push): handles committed together, and each peer
told of exactly the changes of the cards it holds live handles for, in order, resumable."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
import pytest

from broker.cards import status_log
from broker.cards.config import RegistryConfig
from broker.cards.csv_import import CardRow
from broker.cards.handles import Handle, live_handles, open_handles
from broker.cards.model import CardStatus
from broker.cards.registry import Registry, connect
from broker.cards.status_change import set_status
from broker.cards.updates import Change, Progress, Rewind, Update
from broker.gate.push import HandleBook, StatusFeed
from tests.helpers import refuse_rows

RegistryAt = Callable[..., RegistryConfig]
T0 = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)
DAZU, TONGNAN = "500111", "500223"
H1, H2 = "1" * 32, "2" * 32


def row(number: str) -> CardRow:
    return CardRow(number, "h" * 32, date(1950, 1, 1), "active", False, False, date(2030, 1, 1))


@pytest.fixture
def registry(registry_at: RegistryAt) -> Iterator[Registry]:
    reg = Registry(registry_at())
    reg.upsert([row("A1"), row("A2"), row("A3")], T0)
    yield reg
    reg.close()


@pytest.fixture
async def feed(registry: Registry) -> AsyncIterator[StatusFeed]:
    f = StatusFeed(registry.where, clock=lambda: T0, poll_s=0.01)
    yield f
    await f.close()


async def take(updates: AsyncIterator[Update], n: int) -> list[Update]:
    out = []
    async with asyncio.timeout(5):
        async for u in updates:
            out.append(u)
            if len(out) == n:
                break
    return out


async def test_handles_given_in_one_turn_are_all_committed_before_their_callers_go_on(
    registry: Registry,
):
    book = HandleBook(registry.where)
    try:
        until = T0 + timedelta(minutes=2)
        await asyncio.gather(
            book.remember(Handle(DAZU, "A1", H1, until)),
            book.remember(Handle(DAZU, "A2", H2, until)),
            book.remember(Handle(TONGNAN, "A1", H2, until)),
        )
        handles = open_handles(registry.where)
        got = live_handles(handles, DAZU, ["A1", "A2"], T0)
        handles.close()
        assert got == {
            "A1": (H1, until),
            "A2": (H2, until),
        }
    finally:
        book.close()


async def test_a_handle_that_cannot_be_committed_fails_its_caller(registry: Registry):
    """The caller must not answer as if the peer would be told of changes."""
    handles = open_handles(registry.where)
    refused = refuse_rows(handles, "peer_handles", "card_number", "A1")
    handles.close()
    book = HandleBook(registry.where)
    try:
        with pytest.raises(refused):
            await book.remember(Handle(DAZU, "A1", H1, T0))
    finally:
        book.close()


async def test_a_peer_is_told_only_of_its_cards_and_progress_past_the_others(
    registry: Registry, feed: StatusFeed
):
    book = HandleBook(registry.where)
    await book.remember(Handle(DAZU, "A1", H1, T0 + timedelta(minutes=2)))
    await book.remember(Handle(TONGNAN, "A2", H2, T0 + timedelta(minutes=2)))
    book.close()
    start = await feed.head()
    set_status(registry, ["A2"], "lost", T0 + timedelta(seconds=10))  # Tongnan's card
    set_status(registry, ["A1"], "lost", T0 + timedelta(seconds=20))
    set_status(registry, ["A3"], "suspended", T0 + timedelta(seconds=30))  # nobody's
    dazu = await take(feed.updates(DAZU, start), 2)
    assert [type(u) for u in dazu] == [Change, Progress]
    change = dazu[0]
    assert isinstance(change, Change)
    assert (change.handle, change.status, change.position.seq) == (
        H1,
        CardStatus.LOST,
        start.seq + 2,
    )
    assert dazu[1].position == await feed.head()
    tongnan = await take(feed.updates(TONGNAN, start), 2)
    assert [(type(u), getattr(u, "handle", None)) for u in tongnan] == [
        (Change, H2),
        (Progress, None),
    ]


async def test_a_handle_that_had_ended_when_the_change_was_logged_is_not_told(
    registry: Registry, feed: StatusFeed
):
    book = HandleBook(registry.where)
    await book.remember(Handle(DAZU, "A1", H1, T0 + timedelta(minutes=2)))
    book.close()
    start = await feed.head()
    set_status(registry, ["A1"], "lost", T0 + timedelta(minutes=3))
    [only] = await take(feed.updates(DAZU, start), 1)
    assert isinstance(only, Progress) and only.position == await feed.head()


async def test_a_stream_waits_for_the_next_change_and_a_new_one_resumes_where_it_stopped(
    registry: Registry, feed: StatusFeed
):
    book = HandleBook(registry.where)
    await book.remember(Handle(DAZU, "A1", H1, T0 + timedelta(hours=1)))
    await book.remember(Handle(DAZU, "A2", H2, T0 + timedelta(hours=1)))
    book.close()
    head = await feed.head()
    stream = feed.updates(DAZU, head)
    assert await take(stream, 1) == [Progress(head)]  # the cursor is good: said at once
    waiting = asyncio.ensure_future(take(stream, 1))
    await asyncio.sleep(0.1)
    assert not waiting.done()  # nothing yet: it waits, it does not end
    set_status(registry, ["A1"], "lost", T0 + timedelta(minutes=1))
    [first] = await waiting
    assert isinstance(first, Change) and first.handle == H1
    await stream.aclose()  # the peer went away (a connection aged out, say)
    set_status(registry, ["A2"], "suspended", T0 + timedelta(minutes=2))
    set_status(registry, ["A1"], "active", T0 + timedelta(minutes=3))
    resumed = await take(feed.updates(DAZU, first.position), 2)
    assert [(u.handle, u.status) for u in resumed if isinstance(u, Change)] == [
        (H2, CardStatus.SUSPENDED),
        (H1, CardStatus.ACTIVE),
    ]


async def test_no_cursor_a_reset_log_or_a_purged_one_rewinds_to_the_head(
    registry: Registry, feed: StatusFeed
):
    [fresh] = await take(feed.updates(DAZU, None), 1)
    assert isinstance(fresh, Rewind) and fresh.position == await feed.head()
    old = await feed.head()
    status_log.reset(registry.db, "e" * 32, T0)
    [reset] = await take(feed.updates(DAZU, old), 1)
    assert isinstance(reset, Rewind) and reset.position.epoch == "e" * 32


async def test_a_stream_waiting_at_the_head_notices_a_reset(registry: Registry, feed: StatusFeed):
    """The head moving *back* (a new epoch at 0) must wake a waiting stream, not strand it."""
    stream = feed.updates(DAZU, await feed.head())
    await take(stream, 1)  # the greeting
    waiting = asyncio.ensure_future(take(stream, 1))
    await asyncio.sleep(0.1)
    status_log.reset(registry.db, "e" * 32, T0)
    [rewind] = await waiting
    assert isinstance(rewind, Rewind)
    await stream.aclose()


async def test_neither_the_head_nor_a_handle_waits_for_a_writer_of_the_registry(
    registry: Registry, feed: StatusFeed
):
    """An import holding the registry's write lock (for seconds, on a big file) must not
    hold up a Recognize: the head is read without a lock, handles have their own file (on
    PostgreSQL: their own rows, and the head is read from a snapshot)."""
    importing = connect(registry.where)
    if importing.dialect == "sqlite":
        importing.execute("BEGIN IMMEDIATE")
    else:  # the locks an import holds: the log's counter row, and cards' rows
        importing.execute("BEGIN")
        importing.execute("UPDATE status_log SET head = head WHERE id = 1")
        importing.execute("LOCK TABLE cards IN EXCLUSIVE MODE")
    book = HandleBook(registry.where)
    try:
        started = time.monotonic()
        head = await feed.head()
        await book.remember(Handle(DAZU, "A1", H1, T0))
        assert time.monotonic() - started < 1.0  # the busy timeout is 5 s
        assert head.seq > 0
    finally:
        importing.execute("ROLLBACK")
        importing.close()
        book.close()


# ---------------------------------------------------------------- PostgreSQL: NOTIFY, not the poll


@pytest.fixture
def pg_registry(postgres_url: str) -> Iterator[Registry]:
    schema = f"yk_push_{secrets.token_hex(4)}"
    reg = Registry(RegistryConfig(None, url=postgres_url, schema=schema))
    reg.upsert([row("A1"), row("A2")], T0)
    yield reg
    reg.close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


async def changed_within(feed: StatusFeed, registry: Registry, card: str, bound: float) -> None:
    """A change of ``card`` (committed by another connection, as another host would) reaches
    a stream waiting at the head within ``bound`` seconds."""
    stream = feed.updates(DAZU, await feed.head())
    try:
        await take(stream, 1)  # the greeting: the stream now waits for a change
        waiting = asyncio.ensure_future(take(stream, 1))
        await asyncio.sleep(0.1)
        set_status(registry, [card], "lost", T0 + timedelta(minutes=1))
        async with asyncio.timeout(bound):
            [got] = await waiting
        assert isinstance(got, Change) and got.status is CardStatus.LOST
    finally:
        await stream.aclose()


async def test_on_postgresql_a_change_wakes_the_feed_at_once_not_at_the_next_poll(
    pg_registry: Registry,
):
    book = HandleBook(pg_registry.where)
    await book.remember(Handle(DAZU, "A1", H1, T0 + timedelta(hours=1)))
    book.close()
    feed = StatusFeed(pg_registry.where, clock=lambda: T0, poll_s=60)  # a poll would be late
    try:
        started = time.monotonic()
        await changed_within(feed, pg_registry, "A1", 5.0)
        assert time.monotonic() - started < 5.0
        assert feed.notified >= 1
    finally:
        await feed.close()


async def test_on_postgresql_the_listener_comes_back_after_its_connection_is_killed(
    pg_registry: Registry, postgres_url: str
):
    book = HandleBook(pg_registry.where)
    await book.remember(Handle(DAZU, "A2", H2, T0 + timedelta(hours=1)))
    book.close()
    feed = StatusFeed(pg_registry.where, clock=lambda: T0, poll_s=60)
    try:
        await take(feed.updates(DAZU, await feed.head()), 1)  # the listener is started
        channel = status_log.channel(pg_registry.db)
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            killed: list[tuple[Any, ...]] = []
            for _ in range(100):  # until it listens (5 s at most), then kill its backend
                killed = admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = %s",
                    (f'LISTEN "{channel}"',),
                ).fetchall()
                if killed:
                    break
                await asyncio.sleep(0.05)
            assert killed, "the feed never listened"
        await changed_within(feed, pg_registry, "A2", 5.0)  # it listens again
    finally:
        await feed.close()


async def test_a_feed_closed_as_it_is_woken_still_closes(registry: Registry):
    """The wake and the close in one turn of the loop: the poller must not take the wake
    and lose the cancellation (asyncio.wait_for on 3.11 did), or close() waits forever."""
    feed = StatusFeed(registry.where, clock=lambda: T0, poll_s=60)
    stream = feed.updates(DAZU, await feed.head())
    await take(stream, 1)  # the poller runs, and waits for its next poll
    await asyncio.sleep(0.05)
    feed.poke()
    async with asyncio.timeout(5):
        await feed.close()
    await stream.aclose()
