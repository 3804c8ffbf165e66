"""The in-memory copy of a PostgreSQL registry's cards that a node's gates read."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta

import psycopg
import pytest

from broker.cards import status_log
from broker.cards.config import RegistryConfig
from broker.cards.csv_import import CardRow
from broker.cards.mirror import READ_LIMIT, CardCopy
from broker.cards.registry import Registry
from broker.cards.status_change import set_status

T0 = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)


def row(number: str, status: str = "active") -> CardRow:
    return CardRow(number, "h" * 32, date(1950, 1, 1), status, False, False, date(2030, 1, 1))


@pytest.fixture
def where(postgres_url: str) -> Iterator[RegistryConfig]:
    schema = f"yk_copy_{secrets.token_hex(4)}"
    yield RegistryConfig(None, url=postgres_url, schema=schema)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture
def registry(where: RegistryConfig) -> Iterator[Registry]:
    reg = Registry(where)
    reg.upsert([row("A1"), row("A2"), row("A3", "suspended")], T0)
    yield reg
    reg.close()


@pytest.fixture
def copy(where: RegistryConfig, registry: Registry) -> Iterator[CardCopy]:
    c = CardCopy(where, poll_s=60)
    yield c
    c.close()


def same(copy: CardCopy, registry: Registry, number: str) -> bool:
    return copy.lookup(number) == registry.lookup(number)


def test_a_load_copies_every_card_with_the_logs_position(copy: CardCopy, registry: Registry):
    assert copy.load() == 3
    assert copy.position == status_log.head(registry.db)
    assert all(same(copy, registry, n) for n in ("A1", "A2", "A3"))
    assert copy.lookup("B9") is None  # not this district's


def test_changes_and_new_cards_reach_the_copy_through_the_log(copy: CardCopy, registry: Registry):
    copy.load()
    set_status(registry, ["A1"], "lost", T0 + timedelta(minutes=1))
    registry.upsert([row("A4")], T0 + timedelta(minutes=2))
    assert copy.lookup("A1").status == "active"  # type: ignore[union-attr]  # not yet followed
    assert copy.follow() == 2
    assert copy.lookup("A1").status == "lost"  # type: ignore[union-attr]
    assert same(copy, registry, "A4")
    assert copy.position == status_log.head(registry.db)
    assert copy.follow() == 0  # nothing new: nothing read again


def test_more_changes_than_one_read_are_followed_in_parts(copy: CardCopy, registry: Registry):
    copy.load()
    registry.upsert([row(f"B{i}") for i in range(READ_LIMIT + 5)], T0 + timedelta(minutes=1))
    assert copy.follow() == READ_LIMIT
    assert copy.follow() == 5
    assert same(copy, registry, f"B{READ_LIMIT + 4}")


def test_a_reset_log_is_loaded_again_whole(copy: CardCopy, registry: Registry):
    copy.load()
    status_log.reset(registry.db, secrets.token_hex(16), T0 + timedelta(hours=1))
    set_status(registry, ["A2"], "lost", T0 + timedelta(hours=2))
    copy.follow()
    assert copy.loads == 2
    assert copy.lookup("A2").status == "lost"  # type: ignore[union-attr]
    assert copy.position == status_log.head(registry.db)


async def test_a_started_copy_follows_a_change_made_elsewhere_at_once(
    copy: CardCopy, registry: Registry
):
    """``NOTIFY`` wakes it: a poll every minute would be far too late."""
    copy.load()
    copy.start()
    started = time.monotonic()
    set_status(registry, ["A1"], "lost", T0 + timedelta(minutes=1))
    async with asyncio.timeout(5):
        while copy.lookup("A1").status != "lost":  # type: ignore[union-attr]  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert time.monotonic() - started < 5
