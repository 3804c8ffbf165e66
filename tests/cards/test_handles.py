"""Peers' handles at home: only well-formed ones, one live per (peer, card), until their end."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.cards.config import RegistryConfig
from broker.cards.handles import (
    PER_STATEMENT,
    Handle,
    handles_path,
    live_handles,
    open_handles,
    purge,
    remember,
    valid_handle,
)
from broker.core.db import Db

RegistryAt = Callable[..., RegistryConfig]
T0 = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)
H1, H2 = "0123456789abcdef" * 2, "fedcba9876543210" * 2


class Handles:
    """The handles file beside a registry at ``<dir>/r.sqlite3``."""

    def __init__(self, where: RegistryConfig) -> None:
        self.db: Db = open_handles(where)

    def close(self) -> None:
        self.db.close()


def test_handles_live_in_a_file_of_their_own_beside_the_registry(tmp_path: Path):
    assert handles_path(tmp_path / "registry.sqlite3") == tmp_path / "registry-handles.sqlite3"


@pytest.mark.parametrize(
    "text",
    ["", "0" * 31, "0" * 33, H1.upper(), "g" * 32, " " + H1[1:], "٠" * 32, H1[:31] + "\n"],
)
def test_anything_but_32_lowercase_hex_characters_is_not_a_handle(text: str):
    assert not valid_handle(text)


@given(st.text(max_size=40))
def test_a_handle_is_exactly_what_a_cache_key_looks_like(text: str):
    assert valid_handle(text) == (len(text) == 32 and all(c in "0123456789abcdef" for c in text))


def test_a_new_handle_replaces_the_peers_old_one_and_peers_do_not_see_each_other(
    registry_at: RegistryAt,
):
    reg = Handles(registry_at())
    remember(reg.db, [Handle("500111", "A1", H1, T0 + timedelta(minutes=2))])
    remember(
        reg.db,
        [
            Handle("500111", "A1", H2, T0 + timedelta(minutes=3)),
            Handle("512021", "A1", H1, T0 + timedelta(minutes=2)),
        ],
    )
    assert live_handles(reg.db, "500111", ["A1", "A2"], T0) == {
        "A1": (H2, T0 + timedelta(minutes=3))
    }
    assert live_handles(reg.db, "512021", ["A1"], T0) == {"A1": (H1, T0 + timedelta(minutes=2))}
    assert live_handles(reg.db, "500153", ["A1"], T0) == {}
    reg.close()


def test_the_same_handle_given_again_never_shortens_its_life(registry_at: RegistryAt):
    reg = Handles(registry_at())
    later = T0 + timedelta(minutes=10)
    remember(reg.db, [Handle("500111", "A1", H1, later)])
    remember(reg.db, [Handle("500111", "A1", H1, T0 + timedelta(minutes=2))])
    assert live_handles(reg.db, "500111", ["A1"], T0 + timedelta(minutes=5)) == {"A1": (H1, later)}
    reg.close()


def test_a_handle_past_its_end_is_not_live_and_is_purged(registry_at: RegistryAt):
    reg = Handles(registry_at())
    remember(
        reg.db, [Handle("500111", "A1", H1, T0), Handle("500111", "A2", H2, T0 + timedelta(1))]
    )
    assert live_handles(reg.db, "500111", ["A1"], T0) == {"A1": (H1, T0)}  # its last instant
    assert live_handles(reg.db, "500111", ["A1"], T0 + timedelta(seconds=1)) == {}
    assert purge(reg.db, T0 + timedelta(seconds=1)) == 1
    assert set(live_handles(reg.db, "500111", ["A1", "A2"], T0)) == {"A2"}
    reg.close()


def test_purging_in_parts_takes_every_ended_handle(registry_at: RegistryAt):
    reg = Handles(registry_at())
    remember(reg.db, [Handle("500111", f"C{i}", H1, T0) for i in range(7)])
    assert purge(reg.db, T0 + timedelta(seconds=1), chunk=2) == 7
    assert live_handles(reg.db, "500111", [f"C{i}" for i in range(7)], T0) == {}
    reg.close()


def test_many_cards_are_looked_up_in_parts(registry_at: RegistryAt):
    reg = Handles(registry_at())
    cards = [f"C{i:05d}" for i in range(1200)]
    remember(reg.db, [Handle("500111", c, H1, T0) for c in cards[::2]])
    assert sorted(live_handles(reg.db, "500111", cards, T0)) == cards[::2]
    reg.close()


def test_one_call_keeps_the_later_of_two_for_a_card_and_many_in_parts(registry_at: RegistryAt):
    reg = Handles(registry_at())
    later = T0 + timedelta(minutes=2)
    remember(reg.db, [Handle("500111", "A1", H1, later), Handle("500111", "A1", H2, later)])
    assert live_handles(reg.db, "500111", ["A1"], T0) == {"A1": (H2, later)}
    many = [Handle("500111", f"M{i}", H1, later) for i in range(PER_STATEMENT * 2 + 7)]
    remember(reg.db, many)
    got = live_handles(reg.db, "500111", [h.card_number for h in many], T0)
    assert len(got) == len(many)
    reg.close()
