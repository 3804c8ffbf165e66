"""``broker demo``: three districts recognising each other's card-holders on loopback.

Starts Dazu (500111), Anyue (512021) and Rongchang (500153) as real gRPC
servers with their own CAs and synthetic registries, runs a stream of gate
checks of cards from all three (and some from Yongchuan, 500118, with which
no agreement is configured) at all four scenes, and reports per (gate
district, home district): checks, allowed/denied, decision sources and
latency. Every decision is compared with what the synthetic registry says
the card's status is; ``mismatches`` must be 0.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import grpc

from broker._proto.yikatong.v1 import types_pb2
from broker.cards.districts import district_names
from broker.cards.model import CardRef, Scene, shanghai_day
from broker.node.metrics import percentile
from broker.node.server import Node
from broker.testbed.build import SyntheticCard, build
from broker.testbed.clock import DayClock
from broker.testbed.demo_day import run_day
from broker.testbed.operator_client import GateClient

DISTRICTS = ("500111", "512021", "500153")
UNCONFIGURED = "500118"
HOT_CARDS = 40
SCENES = (Scene.BUS, Scene.SCENIC_AREA, Scene.MUSEUM, Scene.LIBRARY)


@dataclass
class PairStats:
    """Checks at one gate district of cards from one home district."""

    checks: int = 0
    allowed: int = 0
    denied: int = 0
    mismatches: int = 0
    charged_fen: int = 0
    concession_fen: int = 0
    sources: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        ordered = sorted(self.latencies_ms)
        return {
            "checks": self.checks,
            "allowed": self.allowed,
            "denied": self.denied,
            "mismatches": self.mismatches,
            "charged_fen": self.charged_fen,
            "concession_fen": self.concession_fen,
            "sources": dict(sorted(self.sources.items())),
            "p50_ms": round(percentile(ordered, 50), 3),
            "p99_ms": round(percentile(ordered, 99), 3),
        }


@dataclass
class DemoReport:
    pairs: dict[tuple[str, str], PairStats]
    seconds: float
    settlement: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        names = district_names()
        return {
            "seconds": round(self.seconds, 3),
            "checks": sum(p.checks for p in self.pairs.values()),
            "mismatches": sum(p.mismatches for p in self.pairs.values()),
            "pairs": [
                {
                    "gate_district": g,
                    "gate_name": names.get(g, g),
                    "home_district": h,
                    "home_name": names.get(h, h),
                    **stats.as_dict(),
                }
                for (g, h), stats in sorted(self.pairs.items())
            ],
            "settlement": self.settlement,
        }


def expected_allow(card: SyntheticCard | None, now: datetime) -> bool:
    """What the synthetic data says the gate must answer."""
    if card is None or card.ref.issuer_region not in DISTRICTS:
        return False
    return card.status == "active" and shanghai_day(now) <= card.valid_until


def plan_checks(
    cards: dict[str, list[SyntheticCard]], count: int, rng: random.Random
) -> list[tuple[str, CardRef, SyntheticCard | None, Scene]]:
    """The stream of checks: mostly registered cards, some unknown ones, some from Yongchuan."""
    plan = []
    for i in range(count):
        gate = rng.choice(DISTRICTS)
        roll = rng.random()
        card: SyntheticCard | None
        if roll < 0.04:
            ref, card = CardRef(UNCONFIGURED, f"Y{i:09d}"), None
        elif roll < 0.10:
            home = rng.choice(DISTRICTS)
            ref, card = CardRef(home, f"U{home}{rng.randrange(10**7):07d}"), None
        else:
            # Gates see regulars again and again: most taps come from a small hot set.
            pool = cards[rng.choice(DISTRICTS)]
            card = rng.choice(pool[:HOT_CARDS] if rng.random() < 0.8 else pool)
            ref = card.ref
        plan.append((gate, ref, card, rng.choice(SCENES)))
    return plan


async def run_demo(
    root: Path,
    checks: int = 3000,
    concurrency: int = 4,
    cards_per_district: int = 300,
    seed: int = 110,
    on_progress: Callable[[int], None] | None = None,
) -> DemoReport:
    """Build and start the three districts in ``root``, run the checks, stop, report."""
    clock = DayClock()  # the nodes' clock: the settlement day moves it on
    now = clock()
    # The day clock jumps four days on while nobody republishes the bundles (a district's
    # timer would, daily): peers' bundles may be that old here without a health warning.
    setups = build(
        root,
        DISTRICTS,
        now,
        cards_per_district=cards_per_district,
        seed=seed,
        max_bundle_age_s=6 * 86_400,
    )
    nodes = {code: await Node.start(s.config, clock) for code, s in setups.items()}
    channels: dict[str, grpc.aio.Channel] = {}
    try:
        clients = {}
        for code, s in setups.items():
            channels[code] = s.operator_channel(nodes[code].address)
            clients[code] = GateClient(channels[code], s.operator_id, gate_id=f"{code}-gate-1")
        plan = plan_checks({c: s.cards for c, s in setups.items()}, checks, random.Random(seed))
        pairs: dict[tuple[str, str], PairStats] = {}
        sem = asyncio.Semaphore(concurrency)

        async def one(gate: str, ref: CardRef, card: SyntheticCard | None, scene: Scene) -> None:
            async with sem:
                started = time.perf_counter()
                d = await clients[gate].check(ref, scene)
                elapsed = (time.perf_counter() - started) * 1000
            stats = pairs.setdefault((gate, ref.issuer_region), PairStats())
            stats.checks += 1
            stats.allowed += d.allow
            stats.denied += not d.allow
            stats.mismatches += d.allow != expected_allow(card, now)
            stats.charged_fen += d.charged_fen
            stats.concession_fen += d.concession_fen
            stats.sources[
                types_pb2.DecisionSource.Name(d.source).removeprefix("DECISION_SOURCE_")
            ] += 1
            stats.latencies_ms.append(elapsed)
            if on_progress is not None:
                on_progress(1)

        started = time.perf_counter()
        await asyncio.gather(*(one(*item) for item in plan))
        seconds = time.perf_counter() - started
        day = await run_day(setups, channels, clients, clock, seed)
        return DemoReport(pairs, seconds, day)
    finally:
        for ch in channels.values():
            await ch.close()
        # Every node's background loops first (each follows its peers' changes): a node
        # stopping while the others still follow it would be, to them, a peer gone down.
        await asyncio.gather(*(node.supervisor.stop() for node in nodes.values()))
        for node in nodes.values():
            await node.stop(grace=0.5)
