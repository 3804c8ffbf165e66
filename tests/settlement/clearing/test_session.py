"""Opening a Sender from a node config (broker.settlement.clearing.session), and closing it.

The configs are the testbed's (``districts``: certificates, settlement keys,
bundles, registries on disk). One test runs the opened Sender against running
nodes (``cluster``) to show it is wired to the config's key, fares and peers.
"""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from datetime import datetime, timedelta

import grpc
import pytest

from broker.cards.model import Scene, shanghai_day
from broker.core.errors import ConfigError, SettlementStateError
from broker.settlement.clearing.session import open_sender
from broker.settlement.clearing.store import clearing_path
from broker.settlement.config import SettlementKeyConfig
from broker.settlement.ledger import open_ledger
from broker.settlement.trips import ACCEPT, Trip
from broker.testbed.build import DistrictSetup
from tests.conftest import ANYUE, DAZU, Cluster

SHUTDOWN = grpc.ChannelConnectivity.SHUTDOWN


async def test_a_config_without_a_settlement_key_is_refused_before_anything_opens(
    districts: dict[str, DistrictSetup],
) -> None:
    cfg = replace(districts[DAZU].config, settlement=SettlementKeyConfig())
    with pytest.raises(ConfigError, match=r"\[settlement\] key_file"):
        async with open_sender(cfg):
            pytest.fail("no Sender without a key")
    assert cfg.ledger.path is not None
    assert not clearing_path(cfg.ledger.path).exists()


async def test_an_unreadable_settlement_key_is_a_config_error(
    districts: dict[str, DistrictSetup],
) -> None:
    cfg = districts[DAZU].config
    assert cfg.settlement.key_file is not None
    cfg.settlement.key_file.write_text("not a key\n")
    with pytest.raises(ConfigError, match="cannot be read"):
        async with open_sender(cfg):
            pytest.fail("no Sender with a broken key")


async def test_the_sender_is_of_the_config_and_its_channels_and_store_close_after(
    districts: dict[str, DistrictSetup], now: datetime
) -> None:
    cfg = districts[DAZU].config
    async with open_sender(cfg) as sender:
        assert sender.cfg is cfg
        yesterday = shanghai_day(now) - timedelta(days=1)
        assert sender.plan_close(yesterday) is None  # the store is open: nothing to do
        channel = sender._channel(ANYUE)  # the peer channel its calls to ANYUE go out on
        assert channel.get_state() is not SHUTDOWN
    assert channel.get_state() is SHUTDOWN
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        sender.store.db.one("SELECT 1")


async def test_channels_and_store_close_when_the_body_fails(
    districts: dict[str, DistrictSetup],
) -> None:
    with pytest.raises(ZeroDivisionError):
        async with open_sender(districts[DAZU].config) as sender:
            channel = sender._channel(ANYUE)
            _ = 1 / 0
    assert channel.get_state() is SHUTDOWN
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        sender.store.db.one("SELECT 1")


async def test_the_opened_sender_closes_a_day_with_a_running_peer(
    cluster: Cluster, now: datetime
) -> None:
    """Its key is in the peer's bundle, its fares are the config's, progress is reported."""
    dazu = cluster.setups[DAZU]
    when = now - timedelta(minutes=10)
    holder = next(
        c
        for c in cluster.setups[ANYUE].cards
        if c.status == "active" and c.valid_until > shanghai_day(when)
    )
    ledger = open_ledger(dazu.config.ledger.path, None)
    try:
        ride = Trip(
            "transit-01", "s-1", holder.ref, Scene.BUS, "", when, 200, 200, 0, None, "sample-1"
        )
        ledger.record([(ride, ACCEPT)], now)
    finally:
        ledger.close()
    progress: list[tuple[str, int]] = []
    tomorrow = now + timedelta(days=1)  # the sender's clock: the day has ended
    async with open_sender(
        dazu.config, lambda what, n: progress.append((what, n)), lambda: tomorrow
    ) as sender:
        assert await sender.publish_fares(ANYUE) == ["sample-1"]
        report = await sender.close(shanghai_day(when))
    assert report.failures == []
    assert [(b.counterparty, b.lines, b.accepted_claim_fen) for b in report.batches] == [
        (ANYUE, 1, 200)
    ]
    assert progress == [("lines sent", 1)]


async def test_the_opened_sender_runs_on_the_wall_clock_unless_given_one(
    districts: dict[str, DistrictSetup], now: datetime
) -> None:
    """Today has not ended by the wall clock: a close of it is refused, saying when it ends."""
    today = shanghai_day(now)
    async with open_sender(districts[DAZU].config) as sender:
        with pytest.raises(SettlementStateError, match="has not ended; it ends at"):
            sender.plan_close(today)
        assert sender.plan_close(today, force=True) is None  # forced: nothing to send
    async with open_sender(districts[DAZU].config, clock=lambda: now + timedelta(days=1)) as s:
        assert s.plan_close(today) is None
