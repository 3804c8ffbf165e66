"""A day of trips across the testbed's districts, and the figures recomputed without the broker.

The trips are priced at the gates (Gate.Check over mutual TLS) and submitted
by each district's operator (Settlement.SubmitTrips). The expected figures
are computed here from those raw trips, the testbed's agreement terms and
what the test knows of each card — with plain arithmetic, not the broker's
functions — so a statement that agrees with them was not checked against
itself.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from broker._proto.yikatong.v1 import settlement_pb2, settlement_pb2_grpc, types_pb2
from broker.cards.model import Scene, shanghai_day
from broker.settlement.days import day_end, window_end
from broker.testbed.build import SAMPLE_AGREEMENT, DistrictSetup, SyntheticCard
from tests.helpers import channel, run_cli

# What each applied entitlement's concession falls under in testbed.SAMPLE_FARES.
SCHEME = {
    (1, types_pb2.ENTITLEMENT_SENIOR_65): "senior-bus-free",
    (1, types_pb2.ENTITLEMENT_SENIOR_60): "senior-bus-half",
    (1, types_pb2.ENTITLEMENT_DISABLED): "disabled-free",
    (1, types_pb2.ENTITLEMENT_STUDENT): "student-bus",
    (2, types_pb2.ENTITLEMENT_SENIOR_60): "scenic-senior",
    (2, types_pb2.ENTITLEMENT_SENIOR_70): "scenic-senior",
    (2, types_pb2.ENTITLEMENT_DISABLED): "scenic-disabled",
    (2, types_pb2.ENTITLEMENT_STUDENT): "scenic-student",
}


@dataclass
class SentTrip:
    serving: str
    record: settlement_pb2.TripRecord
    active: bool  # the card was ACTIVE when used

    @property
    def home(self) -> str:
        return self.record.card.issuer_region


def expected_claim(t: SentTrip) -> int:
    """The agreement's claim for one line, by hand: charged + concession × share, half up."""
    r = t.record
    if not t.active:
        return 0  # the home district rejects the line: nothing is owed for it
    share = SAMPLE_AGREEMENT["concession_share_bp"].get(
        SCHEME.get((r.scene, r.applied_entitlement), ""), 0
    )
    charged = r.charged_fen if SAMPLE_AGREEMENT["collect_through_home"] else 0
    return int(charged + (2 * r.concession_fen * share + 10_000) // 20_000)


def expected_positions(trips: list[SentTrip]) -> dict[tuple[str, str], int]:
    """(serving, home) → what the home district owes the serving one."""
    owed: dict[tuple[str, str], int] = defaultdict(int)
    for t in trips:
        owed[(t.serving, t.home)] += expected_claim(t)
    return dict(owed)


def operator_stub(
    setup: DistrictSetup, address: str
) -> tuple[object, settlement_pb2_grpc.SettlementStub]:
    ch = channel(
        address,
        setup.code,
        setup.paths.ca_cert.read_bytes(),
        setup.operator_cert.read_bytes(),
        setup.operator_key.read_bytes(),
    )
    return ch, settlement_pb2_grpc.SettlementStub(ch)


def record_for(
    setup: DistrictSetup,
    trip_id: str,
    card: SyntheticCard,
    scene: Scene,
    when: datetime,
    decision: object | None,
) -> settlement_pb2.TripRecord:
    ts = Timestamp()
    ts.FromDatetime(when)
    rec = settlement_pb2.TripRecord(
        operator_id=setup.operator_id,
        trip_id=trip_id,
        card=types_pb2.CardRef(
            issuer_region=card.ref.issuer_region, card_number=card.ref.card_number
        ),
        scene=scene.value,  # type: ignore[arg-type]
        occurred_at=ts,
        fare_version="sample-1",
    )
    if decision is not None:
        rec.gross_fare_fen = decision.gross_fare_fen  # type: ignore[attr-defined]
        rec.charged_fen = decision.charged_fen  # type: ignore[attr-defined]
        rec.concession_fen = decision.concession_fen  # type: ignore[attr-defined]
        rec.applied_entitlement = decision.applied_entitlement  # type: ignore[attr-defined]
    else:  # a card the gate refused, let through on a full fare (the line will be rejected)
        fare = 200 if scene is Scene.BUS else 11_500
        rec.gross_fare_fen = rec.charged_fen = fare
    return rec


async def simulate_day(
    cluster: object, now: datetime, per_pair: int = 12, seed: int = 7, prefix: str = "t"
) -> list[SentTrip]:
    """Trips by each district's card-holders at each other district's gates, submitted.

    Some cards are lost or expired (their lines must be rejected), a few
    trips are submitted twice (they must count once).
    """
    rng = random.Random(seed)
    setups: dict[str, DistrictSetup] = cluster.setups  # type: ignore[attr-defined]
    sent: list[SentTrip] = []
    when = now - timedelta(minutes=10)
    for serving, setup in setups.items():
        gate = cluster.gate(serving)  # type: ignore[attr-defined]
        records = []
        for home, other in setups.items():
            if home == serving:
                continue
            active = [
                c
                for c in other.cards
                if c.status == "active" and c.valid_until >= shanghai_day(now)
            ]
            inactive = [c for c in other.cards if c not in active]
            for i in range(per_pair):
                card = rng.choice(active)
                scene = Scene.BUS if i % 3 else Scene.SCENIC_AREA
                decision = await gate.check(card.ref, scene)
                assert decision.allow, decision.reason
                rec = record_for(
                    setup,
                    f"{prefix}-{home}-{i}",
                    card,
                    scene,
                    when + timedelta(seconds=i),
                    decision,
                )
                records.append(rec)
                sent.append(SentTrip(serving, rec, True))
            card = rng.choice(inactive)
            rec = record_for(setup, f"{prefix}-{home}-x", card, Scene.BUS, when, None)
            records.append(rec)
            sent.append(SentTrip(serving, rec, False))
        ch, stub = operator_stub(setup, cluster.nodes[serving].address)  # type: ignore[attr-defined]
        try:
            reply = await stub.SubmitTrips(
                settlement_pb2.SubmitTripsRequest(trips=records), timeout=30
            )
            assert all(r.reason == "ok" for r in reply.results), reply
            again = await stub.SubmitTrips(  # duplicated submissions: stored once
                settlement_pb2.SubmitTripsRequest(trips=records[:3]), timeout=30
            )
            assert all(r.reason == "ok" for r in again.results)
        finally:
            await ch.close()  # type: ignore[attr-defined]
    return sent


async def cli(*args: str, clock: Callable[[], datetime] | None = None) -> str:
    """A ``broker`` command, in a thread (it runs its own event loop), on ``clock`` if given."""
    return await asyncio.to_thread(functools.partial(run_cli, *args, clock=clock))


def after_day(period: str) -> datetime:
    """A minute after ``period`` ended (Asia/Shanghai): the day may be closed."""
    return day_end(date.fromisoformat(period)) + timedelta(minutes=1)


def after_window(period: str) -> datetime:
    """A minute after the late window of ``period`` closed: a close seals it, then confirm."""
    return window_end(date.fromisoformat(period)) + timedelta(minutes=1)


async def district_positions(setup: DistrictSetup, period: str) -> dict[str, Any]:
    out = await cli(
        "settle",
        "statement",
        "--config",
        str(setup.config_path),
        "--period",
        period,
        "--district",
        "--format",
        "json",
    )
    return dict(json.loads(out))


async def assert_positions_match(
    setups: dict[str, DistrictSetup], trips: list[SentTrip], period: str
) -> dict[str, dict[str, Any]]:
    """Every district's positions equal the recomputation, pair by pair; the nets sum to zero.

    Returns each district's positions by counterparty.
    """
    expected = expected_positions(trips)
    views: dict[str, dict[str, Any]] = {}
    for code, setup in setups.items():
        view = await district_positions(setup, period)
        got = {p["counterparty"]: p for p in view["positions"]}
        assert set(got) == set(setups) - {code}, code
        for other, p in got.items():
            assert p["receivable_fen"] == expected[(code, other)], (code, other)
            assert p["payable_fen"] == expected[(other, code)], (code, other)
        views[code] = got
        assert view["multilateral_net_fen"] == sum(p["net_fen"] for p in got.values())
    assert sum(p["net_fen"] for v in views.values() for p in v.values()) == 0
    return views
