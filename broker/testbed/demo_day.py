"""The demo's settlement day: trips priced at the gates, submitted, closed, exchanged, netted.

Each district's operator prices trips by other districts' card-holders at
its buses and at the Rock Carvings (scenic area) through ``Gate.Check``,
submits them (a few twice: stored once), then each district closes the day
(signed batches to each home district, acknowledged line by line) after
midnight by the nodes' clock. A few trips arrive after the close and go out in a
supplementary batch. Then the clock moves past the day's late window: a last
close seals the day and each district confirms its positions (SETTLED). The
report holds every district's net positions; they sum to zero.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from broker._proto.yikatong.v1 import settlement_pb2, settlement_pb2_grpc, types_pb2
from broker.cards.model import Scene, shanghai_day
from broker.settlement.clearing.positions import positions
from broker.settlement.clearing.session import open_sender
from broker.settlement.days import day_end, window_end
from broker.testbed.build import DistrictSetup
from broker.testbed.clock import DayClock
from broker.testbed.operator_client import GateClient


async def _trips(
    setup: DistrictSetup,
    gate: GateClient,
    others: list[DistrictSetup],
    when: datetime,
    rng: random.Random,
    per_home: int,
    tag: str,
) -> list[settlement_pb2.TripRecord]:
    out = []
    for home in others:
        cards = [c for c in home.cards if c.status == "active"]
        for i in range(per_home):
            card = rng.choice(cards)
            scene = Scene.SCENIC_AREA if i % 5 == 0 else Scene.BUS
            d = await gate.check(card.ref, scene)
            if not d.allow:
                continue
            ts = Timestamp()
            ts.FromDatetime(when + timedelta(seconds=i))
            out.append(
                settlement_pb2.TripRecord(
                    operator_id=setup.operator_id,
                    trip_id=f"{tag}-{home.code}-{i}",
                    card=types_pb2.CardRef(
                        issuer_region=card.ref.issuer_region, card_number=card.ref.card_number
                    ),
                    scene=scene.value,  # type: ignore[arg-type]
                    occurred_at=ts,
                    gross_fare_fen=d.gross_fare_fen,
                    charged_fen=d.charged_fen,
                    concession_fen=d.concession_fen,
                    applied_entitlement=d.applied_entitlement,
                    fare_version=d.fare_version,
                    decision_source=d.source,
                )
            )
    return out


async def run_day(
    setups: dict[str, DistrictSetup],
    channels: Mapping[str, grpc.aio.Channel],
    gates: Mapping[str, GateClient],
    clock: DayClock,
    seed: int,
    per_home: int = 40,
) -> dict[str, Any]:
    """Run the day over the demo's operator channels (one per district) and report it.

    ``clock`` is the nodes' clock too: the day's trips are priced and submitted
    on it, then it moves past midnight (Asia/Shanghai) for the close, and past
    the day's late window (its end + 72 h + 5 min) for the sealing close and
    the confirmation.
    """
    rng = random.Random(seed)
    when = clock() - timedelta(minutes=30)
    period = shanghai_day(when)
    submitted = duplicates = late = 0
    stubs = {code: settlement_pb2_grpc.SettlementStub(ch) for code, ch in channels.items()}
    for code, s in setups.items():
        others = [o for c, o in setups.items() if c != code]
        trips = await _trips(s, gates[code], others, when, rng, per_home, "day")
        await stubs[code].SubmitTrips(settlement_pb2.SubmitTripsRequest(trips=trips))
        # A gate that uploaded its first five trips twice: they are stored once.
        again = await stubs[code].SubmitTrips(settlement_pb2.SubmitTripsRequest(trips=trips[:5]))
        submitted += len(trips)
        duplicates += len(again.results)
    clock.reach(day_end(period) + timedelta(minutes=1))  # the next morning
    for s in setups.values():
        async with open_sender(s.config, clock=clock) as sender:
            await sender.close(period)
    for code, s in setups.items():  # trips uploaded after the close: a supplementary batch
        others = [o for c, o in setups.items() if c != code]
        trips = await _trips(s, gates[code], others[:1], when, rng, 2, "late")
        await stubs[code].SubmitTrips(settlement_pb2.SubmitTripsRequest(trips=trips))
        late += len(trips)
        async with open_sender(s.config, clock=clock) as sender:
            await sender.close(period)
    clock.reach(window_end(period) + timedelta(minutes=1))  # the late window has closed
    for s in setups.values():  # the close that seals the day everywhere (nothing new)
        async with open_sender(s.config, clock=clock) as sender:
            await sender.close(period)
    views: dict[str, list[dict[str, Any]]] = {}
    for code, s in setups.items():
        async with open_sender(s.config, clock=clock) as sender:
            views[code] = []
            for p in positions(sender.store, period, code):
                if p.state != "settled":
                    p = await sender.confirm(p.counterparty, period)
                views[code].append(
                    {
                        "counterparty": p.counterparty,
                        "receivable_fen": p.receivable_fen,
                        "payable_fen": p.payable_fen,
                        "net_fen": p.net_fen,
                        "state": p.state,
                        "open_disputes": p.open_disputes,
                        "batches": len(
                            [
                                b
                                for b in sender.store.out_batches(period)
                                if b["counterparty"] == p.counterparty
                            ]
                        ),
                    }
                )
    nets = {code: sum(p["net_fen"] for p in v) for code, v in views.items()}
    return {
        "period": period.isoformat(),
        "trips": submitted,
        "duplicates_resubmitted": duplicates,
        "late_trips": late,
        "positions": views,
        "multilateral_net_fen": nets,
        "nets_sum_fen": sum(nets.values()),
    }
