"""Trips a gate allowed through a neighbour's outage clear as the agreement says (issue 15).

Anyue (the home) advertises a 1 s TTL and honours its answers 60 s past it; Dazu serves
them STALE at a scenic area, and lets a card it cannot verify through a bus at the
standard fare (``[offline] bus = "allow_standard_fare"``). Anyue stops; Dazu's gate
allows four trips it could not verify with Anyue, the operator submits them marked with
the gate's decision source, Anyue comes back, Dazu closes the day, and Anyue verifies
each line in its own process:

- STALE, card ACTIVE: accepted with its concession claim;
- STALE, card reported lost while Anyue was away (after the answer was given, within
  the TTL + max_stale Anyue advertised): accepted, the home bears its advertised reach;
- OFFLINE_POLICY, card ACTIVE: accepted at the standard fare, no concession;
- OFFLINE_POLICY, card already lost: CARD_NOT_ACTIVE (``offline_risk = "operator"``,
  the default: no answer was given, so the operator bears the unverified card).

An offline trip that claims a concession is refused at intake (``offline_concession``).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from broker._proto.yikatong.v1 import settlement_pb2, types_pb2
from broker.cards.model import Scene, shanghai_day
from broker.cards.registry import Registry
from broker.cards.status_change import set_status
from broker.gate.config import OfflineConfig
from broker.node.server import Node
from broker.testbed import build as testbed
from broker.testbed.clock import DayClock
from tests.clearing_day import (
    SentTrip,
    after_day,
    cli,
    district_positions,
    expected_claim,
    operator_stub,
    record_for,
)
from tests.conftest import ANYUE, DAZU, Cluster

SRC = types_pb2.DecisionSource


async def test_stale_and_offline_trips_clear_as_the_agreement_says(tmp_path: Path, now: datetime):
    setups = testbed.build(tmp_path, (DAZU, ANYUE), now, cards_per_district=50)
    home_cfg = setups[ANYUE].config
    home_cfg = replace(
        home_cfg,
        recognition=replace(home_cfg.recognition, cache_ttl_seconds=1, max_stale_seconds=60),
    )
    cfg = setups[DAZU].config
    cfg = replace(
        cfg,
        cache=replace(cfg.cache, max_stale_seconds={"scenic_area": 600}),
        offline=OfflineConfig({"bus": "allow_standard_fare"}),
    )
    clock = DayClock()
    nodes = {ANYUE: await Node.start(home_cfg, clock), DAZU: await Node.start(cfg, clock)}
    c = Cluster(setups, nodes, clock)
    today = shanghai_day(now)
    active = [x for x in setups[ANYUE].cards if x.status == "active" and x.valid_until >= today]
    stale_card, stale_lost, offline_card, offline_lost = active[:4]
    gate = c.gate(DAZU)
    registry = Registry(setups[ANYUE].config.registry)
    records: list[settlement_pb2.TripRecord] = []

    def trip(name: str, card: object, scene: Scene, d: object) -> None:
        rec = record_for(setups[DAZU], name, card, scene, datetime.now(UTC), d)  # type: ignore[arg-type]
        rec.decision_source = d.source  # type: ignore[attr-defined]
        records.append(rec)

    try:
        # Only a home whose changes Dazu follows is served STALE: its stream must be open
        # before the answers are cached (on a busy machine it may open after the first check).
        async with asyncio.timeout(10):
            await nodes[DAZU].watchers[ANYUE].connected.wait()
        for card in (stale_card, stale_lost):  # answered and cached while Anyue is up
            d = await gate.check(card.ref, Scene.SCENIC_AREA)
            assert d.source == SRC.DECISION_SOURCE_PEER
        answered = time.monotonic()
        await nodes.pop(ANYUE).stop(grace=0)
        # Reported lost at Anyue while it is away: no push can reach Dazu.
        lost = [stale_lost.ref.card_number, offline_lost.ref.card_number]
        set_status(registry, lost, "lost", datetime.now(UTC))
        await asyncio.sleep(max(answered + 1.3 - time.monotonic(), 0))  # past the 1 s TTL
        for name, card in (("t-stale", stale_card), ("t-stale-lost", stale_lost)):
            d = await gate.check(card.ref, Scene.SCENIC_AREA)
            assert d.allow and d.source == SRC.DECISION_SOURCE_STALE, d
            trip(name, card, Scene.SCENIC_AREA, d)
        for name, card in (("t-offline", offline_card), ("t-offline-lost", offline_lost)):
            d = await gate.check(card.ref, Scene.BUS)  # never asked: nothing cached
            assert d.allow and d.source == SRC.DECISION_SOURCE_OFFLINE_POLICY, d
            assert not d.verified and d.concession_fen == 0 and d.charged_fen == d.gross_fare_fen
            assert d.gross_fare_fen > 0
            trip(name, card, Scene.BUS, d)

        greedy = settlement_pb2.TripRecord()
        greedy.CopyFrom(records[2])
        greedy.trip_id = "t-offline-greedy"
        greedy.applied_entitlement = types_pb2.ENTITLEMENT_SENIOR_65
        greedy.concession_fen, greedy.charged_fen = greedy.gross_fare_fen, 0
        ch, stub = operator_stub(setups[DAZU], nodes[DAZU].address)
        try:
            reply = await stub.SubmitTrips(
                settlement_pb2.SubmitTripsRequest(trips=[*records, greedy]), timeout=30
            )
        finally:
            await ch.close()  # type: ignore[attr-defined]
        assert [r.reason for r in reply.results] == ["ok"] * 4 + ["offline_concession"]
        assert "decision_source OFFLINE_POLICY" in reply.results[4].detail

        nodes[ANYUE] = await Node.start(home_cfg, clock)  # back, to verify the close
        period = shanghai_day(records[0].occurred_at.ToDatetime(tzinfo=UTC)).isoformat()
        clock.reach(after_day(period))
        dazu = str(setups[DAZU].config_path)
        assert "close #1" in await cli(
            "settle", "close", "--config", dazu, "--period", period, clock=clock
        )
        disputes = json.loads(
            await cli("settle", "disputes", "--config", dazu, "--format", "json", clock=clock)
        )
        assert [(d["trip_id"], d["code"]) for d in disputes] == [
            ("t-offline-lost", "CARD_NOT_ACTIVE")
        ]
        view = await district_positions(setups[DAZU], period)
        (position,) = view["positions"]
        accepted = [SentTrip(DAZU, r, True) for r in records[:3]]
        assert records[2].charged_fen == records[2].gross_fare_fen  # the standard fare, owed
        assert position["receivable_fen"] == sum(expected_claim(t) for t in accepted)
        assert expected_claim(accepted[2]) == records[2].gross_fare_fen  # collected via home
    finally:
        registry.close()
        await c.close()
