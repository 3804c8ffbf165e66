"""A week across three districts — on SQLite and on PostgreSQL (issue 12).

Three days of trips (D1 = today in Asia/Shanghai, D2, D3), each day closed the
next morning on every district, then all three sealed, disputes settled,
confirmed and checked. Along the way:

- the fare rules change mid-week: every district publishes a second version
  ("sample-2", a dearer bus fare) taking effect on D2. A table's
  ``effective_from`` is a Shanghai calendar day (broker/fares/rules.py), so the
  change happens at the midnight that starts D2, and the 600 s changeover grace
  is exercised just after it;
- a card is reported lost while a neighbour's gate still holds its home's
  ACTIVE answer in its cache: the trip is let through from the cache and the
  home accepts the line (liability follows the answer the gate was given); a
  trip after the TTL is refused at the gate, and the line of one let through
  anyway is rejected;
- a line the home rejects is represented once and accepted.

Every figure is recomputed here from the raw trips with plain arithmetic (the
prices from the fare numbers below, the claims by tests/clearing_day.py), not by
the broker's functions. The home's advertised TTL is lowered to a few seconds in
this module's own cluster, so that "after the TTL" can be waited for in real
time: a gate's cache expires on the monotonic clock, not on the day clock.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import secrets
import time as monotonic_time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, replace
from datetime import date, datetime, time, timedelta
from pathlib import Path

import pytest

from broker._proto.yikatong.v1 import gate_pb2, settlement_pb2, types_pb2
from broker.cards.model import SHANGHAI, Entitlement, Scene
from broker.cards.registry import Registry
from broker.node.config import load_config, render_config
from broker.node.server import Node
from broker.testbed import build as testbed
from broker.testbed.build import SAMPLE_FARES, SyntheticCard
from broker.testbed.clock import DayClock
from broker.testbed.operator_client import GateClient
from tests.clearing_day import (
    SentTrip,
    after_window,
    assert_positions_match,
    cli,
    district_positions,
    expected_claim,
    operator_stub,
    record_for,
)
from tests.conftest import ANYUE, DAZU, RONGCHANG, THREE, Cluster

TTL_S = 10  # what every district advertises as [recognition] cache_ttl_seconds here: short
# enough to wait out (gate caches expire on the monotonic clock, not the day clock), long enough
# that a busy machine still makes its cached check within it
NEW_BUS_FEN = 300  # sample-2's bus fare; sample-1's is 200
# The gross fare of each scene under each version, as written in the fares files.
GROSS = {
    "sample-1": {Scene.BUS: 200, Scene.SCENIC_AREA: 11_500},
    "sample-2": {Scene.BUS: NEW_BUS_FEN, Scene.SCENIC_AREA: 11_500},
}


def second_version(effective: date) -> str:
    """SAMPLE_FARES as "sample-2", in force from ``effective``, with a dearer bus fare."""
    text = SAMPLE_FARES
    for old, new in (
        ('version = "sample-1"', 'version = "sample-2"'),
        ('effective_from = "2020-01-01"', f'effective_from = "{effective.isoformat()}"'),
        ("gross_fare_fen = 200", f"gross_fare_fen = {NEW_BUS_FEN}"),
    ):
        assert text.count(old) == 1, f"SAMPLE_FARES changed: {old!r}"
        text = text.replace(old, new)
    return text


@dataclass
class Week:
    cluster: Cluster
    d1: date

    @property
    def days(self) -> tuple[date, date, date]:
        return self.d1, self.d1 + timedelta(days=1), self.d1 + timedelta(days=2)


@pytest.fixture(params=["sqlite", "postgres"])
async def week(
    request: pytest.FixtureRequest, tmp_path: Path, now: datetime
) -> AsyncIterator[Week]:
    """Three running districts (as ``day_cluster``) whose fares files hold both versions and
    whose advertised TTL is ``TTL_S``, written before the nodes start (fares are read then)."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    prefix = f"ykw{secrets.token_hex(3)}"
    local = now.astimezone(SHANGHAI)
    # D1 is today, unless too little of it is left for its trips and the 23:58 one.
    d1 = local.date() if local.hour < 22 else local.date() + timedelta(days=1)
    setups = testbed.build(
        tmp_path,
        THREE,
        now,
        cards_per_district=60,
        bundle_refresh_s=1,
        ledger_url=url,
        ledger_schema_prefix=prefix,
    )
    for s in setups.values():
        assert s.config.fares.file is not None
        s.config.fares.file.write_text(
            f'district = "{s.code}"\n' + SAMPLE_FARES + second_version(d1 + timedelta(days=1))
        )
        # No stale answers here: the liability window is the TTL alone (test_outages.py
        # covers STALE), so the gate asks again once the TTL has run out.
        recognition = replace(s.config.recognition, cache_ttl_seconds=TTL_S, max_stale_seconds=0)
        cfg = replace(s.config, recognition=recognition)
        s.config_path.write_text(render_config(cfg))
        s.config = load_config(s.config_path, env={})
        assert s.config.recognition.cache_ttl_seconds == TTL_S
    clock = DayClock()
    nodes = {code: await Node.start(s.config, clock) for code, s in setups.items()}
    c = Cluster(setups, nodes, clock)
    try:
        yield Week(c, d1)
    finally:
        await c.close()
        if url:
            import psycopg

            with psycopg.connect(url, autocommit=True) as conn:
                for code in THREE:
                    conn.execute(f"DROP SCHEMA IF EXISTS {prefix}_{code} CASCADE")


# ---------------------------------------------------------------- by hand


def at(day: date, hour: int, minute: int = 0) -> datetime:
    return datetime.combine(day, time(hour, minute), tzinfo=SHANGHAI)


def advance(clock: DayClock, to: datetime) -> None:
    """Move the day clock on to ``to`` (if it is not there already)."""
    if to > clock():
        clock.move_to(to)


def held_by_hand(card: SyntheticCard, day: date) -> set[Entitlement]:
    """The card-holder's entitlements on ``day``: age thresholds 60/65/70, the two flags."""
    born = card.birth_date
    age = day.year - born.year - ((day.month, day.day) < (born.month, born.day))
    seniors = (
        (60, Entitlement.SENIOR_60),
        (65, Entitlement.SENIOR_65),
        (70, Entitlement.SENIOR_70),
    )
    held = {e for years, e in seniors if age >= years}
    if card.disabled:
        held.add(Entitlement.DISABLED)
    if card.student:
        held.add(Entitlement.STUDENT)
    return held


def concession_by_hand(scene: Scene, ent: Entitlement, gross: int) -> int:
    """What ``ent`` takes off ``gross`` under the sample rules (both versions alike)."""
    half = (gross + 1) // 2  # 50 %, rounded half up to the fen
    if scene is Scene.BUS:
        return {
            Entitlement.SENIOR_65: gross,
            Entitlement.SENIOR_60: half,
            Entitlement.DISABLED: gross,
            Entitlement.STUDENT: min(100, gross),
        }.get(ent, 0)
    return {
        Entitlement.SENIOR_60: half,
        Entitlement.SENIOR_70: gross,
        Entitlement.DISABLED: gross,
        Entitlement.STUDENT: half,
    }.get(ent, 0)


def assert_priced(
    d: gate_pb2.GateDecision, card: SyntheticCard, scene: Scene, version: str, day: date
) -> None:
    """The gate allowed the card and priced it as the version's numbers give, by hand."""
    assert d.allow, d.reason
    assert d.fare_version == version
    held = held_by_hand(card, day)
    assert {Entitlement(e) for e in d.entitlements} == held
    gross = GROSS[version][scene]
    best = max((concession_by_hand(scene, e, gross) for e in held), default=0)
    assert (d.gross_fare_fen, d.charged_fen, d.concession_fen) == (gross, gross - best, best)
    applied = d.applied_entitlement
    if best:
        assert Entitlement(applied) in held
        assert concession_by_hand(scene, Entitlement(applied), gross) == best
    else:
        assert applied == 0


def plain(card: SyntheticCard, days: Iterable[date]) -> bool:
    return all(not held_by_hand(card, d) for d in days)


# ---------------------------------------------------------------- talking to the districts


async def submit(
    cluster: Cluster, serving: str, records: list[settlement_pb2.TripRecord]
) -> list[settlement_pb2.TripResult]:
    s = cluster.setups[serving]
    ch, stub = operator_stub(s, cluster.nodes[serving].address)
    try:
        reply = await stub.SubmitTrips(settlement_pb2.SubmitTripsRequest(trips=records), timeout=30)
    finally:
        await ch.close()  # type: ignore[attr-defined]
    assert len(reply.results) == len(records)
    return list(reply.results)


async def submit_ok(cluster: Cluster, trips: list[SentTrip]) -> None:
    for serving in THREE:
        mine = [t.record for t in trips if t.serving == serving]
        if mine:
            results = await submit(cluster, serving, mine)
            assert [r.reason for r in results] == ["ok"] * len(mine), results


async def on_every_district(cluster: Cluster, *args: str) -> dict[str, str]:
    out = {}
    for code in THREE:
        cfg = str(cluster.setups[code].config_path)
        out[code] = await cli("settle", args[0], "--config", cfg, *args[1:], clock=cluster.clock)
    return out


async def close_everywhere(cluster: Cluster, day: date, expect: str) -> None:
    for code, out in (await on_every_district(cluster, "close", "--period", str(day))).items():
        assert expect in out, (code, out)


async def disputes(cluster: Cluster, code: str, day: date) -> dict[tuple[str, str], dict[str, str]]:
    out = await cli(
        "settle",
        "disputes",
        "--config",
        str(cluster.setups[code].config_path),
        "--period",
        day.isoformat(),
        "--format",
        "json",
    )
    return {(r["counterparty"], r["trip_id"]): r for r in json.loads(out)}


def record(
    cluster: Cluster,
    serving: str,
    trip_id: str,
    card: SyntheticCard,
    scene: Scene,
    when: datetime,
    decision: gate_pb2.GateDecision | None,
) -> settlement_pb2.TripRecord:
    rec = record_for(cluster.setups[serving], trip_id, card, scene, when, decision)
    if decision is not None:
        rec.fare_version = decision.fare_version
    return rec


class Trips:
    """The day's trips priced at the gates: each district's operator, the others' cards."""

    def __init__(self, cluster: Cluster, pools: dict[str, list[SyntheticCard]], seed: int):
        self.cluster = cluster
        self.pools = pools
        self.rng = random.Random(seed)
        self.gates: dict[str, GateClient] = {code: cluster.gate(code) for code in THREE}

    async def one(
        self, serving: str, card: SyntheticCard, scene: Scene, trip_id: str, version: str
    ) -> SentTrip:
        decision = await self.gates[serving].check(card.ref, scene)
        when = self.cluster.clock()
        day = when.astimezone(SHANGHAI).date()
        assert_priced(decision, card, scene, version, day)
        return SentTrip(
            serving, record(self.cluster, serving, trip_id, card, scene, when, decision), True
        )

    async def day(self, tag: str, version: str, per_pair: int = 3) -> list[SentTrip]:
        """``per_pair`` trips (bus, bus, scenic, …) by distinct cards for every pair."""
        out = []
        for serving in THREE:
            for home in THREE:
                if home == serving:
                    continue
                cards = self.rng.sample(self.pools[home], per_pair)
                for i, card in enumerate(cards):
                    scene = Scene.SCENIC_AREA if i % 3 == 2 else Scene.BUS
                    out.append(await self.one(serving, card, scene, f"{tag}-{home}-{i}", version))
        return out


def checked_counts(out: str) -> tuple[int, int, int]:
    m = re.search(
        r"(\d+) accepted trip\(s\) of neighbours' card-holders, (\d+) in batches, "
        r"(\d+) not closed yet",
        " ".join(out.split()),
    )
    assert m, out
    return int(m[1]), int(m[2]), int(m[3])


# ---------------------------------------------------------------- the week


async def test_a_week_with_a_fare_change_a_lost_card_and_a_representment(week: Week):
    cluster, clock = week.cluster, week.cluster.clock
    d1, d2, d3 = week.days
    the_week = (d1, d2, d3, d3 + timedelta(days=1))
    usable = {
        code: [
            c
            for c in cluster.setups[code].cards
            if c.status == "active" and c.valid_until > d3 + timedelta(days=7)
        ]
        for code in THREE
    }
    # Cards kept for the special cases, all of Anyue, none with an entitlement all week.
    plain_anyue = [c for c in usable[ANYUE] if plain(c, the_week)]
    assert len(plain_anyue) >= 4, "the testbed has too few plain Anyue cards"
    lost_card, wrong_card, old_table_card, grace_card = plain_anyue[:4]
    special = {lost_card, wrong_card, old_table_card, grace_card}
    pools = {code: [c for c in cards if c not in special] for code, cards in usable.items()}
    trips = Trips(cluster, pools, seed=12)
    by_day: dict[date, list[SentTrip]] = {d1: [], d2: [], d3: []}

    # ---- D1: trips priced by sample-1, the last at 23:58.
    advance(clock, at(d1, 9))
    by_day[d1] += await trips.day("d1", "sample-1")
    advance(clock, at(d1, 23, 58))
    rc_card = pools[RONGCHANG][0]
    by_day[d1].append(await trips.one(DAZU, rc_card, Scene.BUS, "d1-late", "sample-1"))
    await submit_ok(cluster, by_day[d1])

    # ---- D2 just after midnight: the gates price by sample-2 now (their clock says D2) ...
    advance(clock, at(d2, 0, 2))
    dz_card = pools[DAZU][0]
    by_day[d2].append(await trips.one(RONGCHANG, dz_card, Scene.BUS, "d2-first", "sample-2"))
    # ... and a gate a little behind priced this one by sample-1: within the 600 s grace.
    grace = record(cluster, RONGCHANG, "d2-grace", grace_card, Scene.BUS, clock(), None)
    assert (grace.fare_version, grace.gross_fare_fen, grace.charged_fen) == ("sample-1", 200, 200)
    by_day[d2].append(SentTrip(RONGCHANG, grace, True))
    await submit_ok(cluster, by_day[d2])  # accepted at intake (the home's verdict comes below)

    # ---- D2 morning: D1 is closed on every district; every line accepted.
    advance(clock, at(d2, 8))
    await close_everywhere(cluster, d1, "close #1")
    views = await assert_positions_match(cluster.setups, by_day[d1], d1.isoformat())
    assert {p["open_disputes"] for v in views.values() for p in v.values()} == {0}

    # ---- D2 afternoon: trips by sample-2.
    advance(clock, at(d2, 14))
    today = await trips.day("d2", "sample-2")
    await submit_ok(cluster, today)
    by_day[d2] += today

    # An operator pricing by the older, more generous table is refused at intake; a line
    # claiming a senior's free ride for a plain card is taken (the price adds up) — for now.
    old_table = record(cluster, DAZU, "d2-old-table", old_table_card, Scene.BUS, clock(), None)
    wrong = record(cluster, DAZU, "d2-wrong", wrong_card, Scene.BUS, clock(), None)
    wrong.fare_version = "sample-2"
    wrong.gross_fare_fen, wrong.charged_fen, wrong.concession_fen = NEW_BUS_FEN, 0, NEW_BUS_FEN
    wrong.applied_entitlement = Entitlement.SENIOR_65.value  # type: ignore[assignment]
    results = await submit(cluster, DAZU, [old_table, wrong])
    assert [r.reason for r in results] == ["unknown_fare_version", "ok"], results
    assert results[0].outcome == settlement_pb2.TRIP_OUTCOME_REJECTED
    assert "sample-1" in results[0].detail
    by_day[d2].append(SentTrip(DAZU, wrong, False))  # the home will reject it

    # A Dazu gate asks Anyue about a card (PEER) and keeps the answer for the TTL. Dazu's
    # node then stops following Anyue's changes (its stream down, as in an outage): the
    # loss below does not reach it, and the answer it holds is the one in force.
    dazu_gate, anyue_gate = trips.gates[DAZU], trips.gates[ANYUE]
    first = await dazu_gate.check(lost_card.ref, Scene.BUS)
    await cluster.nodes[DAZU].supervisor.stop_one(f"status-watch-{ANYUE}")
    asked = monotonic_time.monotonic()
    assert first.allow and first.source == types_pb2.DECISION_SOURCE_PEER
    # Anyue's back office reports the card lost; its registry records it now.
    lost_at = clock()
    anyue_registry = Registry(cluster.setups[ANYUE].config.registry)
    try:
        row = anyue_registry.lookup(lost_card.ref.card_number)
        assert row is not None and row.status == "active"
        anyue_registry.upsert(
            [replace(row, status="lost", changed_at=lost_at, recorded_at=lost_at)], lost_at
        )
    finally:
        anyue_registry.close()
    at_home = await anyue_gate.check(lost_card.ref, Scene.BUS)
    assert (at_home.allow, at_home.status, at_home.source) == (
        False,
        types_pb2.CARD_STATUS_LOST,
        types_pb2.DECISION_SOURCE_HOME,
    )
    # Within the TTL, the Dazu gate still lets it through from its cache.
    cached = await dazu_gate.check(lost_card.ref, Scene.BUS)
    cached_at = clock()
    assert monotonic_time.monotonic() - asked < TTL_S, "too slow: the TTL ran out; rerun"
    assert (
        cached.source == types_pb2.DECISION_SOURCE_CACHE
        and cached.status == types_pb2.CARD_STATUS_ACTIVE
    )
    assert_priced(cached, lost_card, Scene.BUS, "sample-2", d2)
    assert cached_at > lost_at  # the trip was made after the card was reported lost
    liable = SentTrip(
        DAZU, record(cluster, DAZU, "d2-cached", lost_card, Scene.BUS, cached_at, cached), True
    )
    await submit_ok(cluster, [liable])
    by_day[d2].append(liable)
    # After the TTL, the gate asks again and is told LOST: refused.
    await asyncio.sleep(max(0.0, asked + TTL_S + 1.5 - monotonic_time.monotonic()))
    refused = await dazu_gate.check(lost_card.ref, Scene.BUS)
    assert (refused.allow, refused.status, refused.source) == (
        False,
        types_pb2.CARD_STATUS_LOST,
        types_pb2.DECISION_SOURCE_PEER,
    )
    assert (refused.gross_fare_fen, refused.charged_fen) == (0, 0)
    # Let through anyway on a full fare and uploaded: the home will reject that line.
    let_through = record(cluster, DAZU, "d2-after-ttl", lost_card, Scene.BUS, clock(), None)
    let_through.fare_version, let_through.place_id = "sample-2", "route-9"
    let_through.gross_fare_fen = let_through.charged_fen = NEW_BUS_FEN
    late_line = SentTrip(DAZU, let_through, False)
    await submit_ok(cluster, [late_line])
    by_day[d2].append(late_line)

    # ---- D3 morning: D2 closed. The grace line and the line of the cached answer are
    # accepted; the line of the card lost before the TTL and the wrong entitlement are not.
    advance(clock, at(d3, 8))
    await close_everywhere(cluster, d2, "close #1")
    assert await disputes(cluster, ANYUE, d2) == {}
    assert await disputes(cluster, RONGCHANG, d2) == {}  # "d2-grace" included
    dazu_disputes = await disputes(cluster, DAZU, d2)
    assert {k: (v["code"], v["state"]) for k, v in dazu_disputes.items()} == {
        (ANYUE, "d2-wrong"): ("ENTITLEMENT_MISMATCH", "open"),
        (ANYUE, "d2-after-ttl"): ("CARD_NOT_ACTIVE", "open"),
    }
    await assert_positions_match(cluster.setups, by_day[d2], d2.isoformat())

    # The wrong line represented once, with the corrected entitlement and amounts: accepted.
    dazu_cfg = str(cluster.setups[DAZU].config_path)
    represented = await cli(
        "settle",
        "represent",
        "--config",
        dazu_cfg,
        "--district",
        ANYUE,
        "--operator",
        cluster.setups[DAZU].operator_id,
        "--trip",
        "d2-wrong",
        "--entitlement",
        "none",
        "--charged-fen",
        str(NEW_BUS_FEN),
        "--concession-fen",
        "0",
        clock=clock,
    )
    assert "accepted" in represented and "final" not in represented, represented
    corrected = settlement_pb2.TripRecord()
    corrected.CopyFrom(wrong)
    corrected.charged_fen, corrected.concession_fen = NEW_BUS_FEN, 0
    corrected.applied_entitlement = 0  # type: ignore[assignment]
    by_day[d2] = [t for t in by_day[d2] if t.record.trip_id != "d2-wrong"]
    by_day[d2].append(SentTrip(DAZU, corrected, True))
    assert expected_claim(by_day[d2][-1]) == NEW_BUS_FEN
    assert (await disputes(cluster, DAZU, d2))[(ANYUE, "d2-wrong")]["state"] == "accepted"
    await assert_positions_match(cluster.setups, by_day[d2], d2.isoformat())

    # ---- D3: trips by sample-2; closed the next morning.
    advance(clock, at(d3, 10))
    by_day[d3] += await trips.day("d3", "sample-2")
    await submit_ok(cluster, by_day[d3])
    advance(clock, at(d3 + timedelta(days=1), 8))
    await close_everywhere(cluster, d3, "close #1")
    await assert_positions_match(cluster.setups, by_day[d3], d3.isoformat())

    # ---- After D3's late window: seal every day, settle the last dispute, confirm, check.
    advance(clock, after_window(d3.isoformat()))
    for day in (d1, d2, d3):
        await close_everywhere(cluster, day, "nothing new to send")
    await cli(
        "settle",
        "resolve",
        "--config",
        dazu_cfg,
        "--district",
        ANYUE,
        "--operator",
        cluster.setups[DAZU].operator_id,
        "--trip",
        "d2-after-ttl",
        "--note",
        "travelled after the TTL on a card reported lost: the operator bears it",
        clock=clock,
    )
    assert {k: v["state"] for k, v in (await disputes(cluster, DAZU, d2)).items()} == {
        (ANYUE, "d2-wrong"): "accepted",
        (ANYUE, "d2-after-ttl"): "resolved",
    }
    for day in (d1, d2, d3):
        await on_every_district(cluster, "confirm", "--period", day.isoformat())
    for day in (d1, d2, d3):
        period = day.isoformat()
        for code in THREE:
            view = await district_positions(cluster.setups[code], period)
            assert {p["state"] for p in view["positions"]} == {"settled"}, (code, period)
            assert {p["open_disputes"] for p in view["positions"]} == {0}, (code, period)
        await assert_positions_match(cluster.setups, by_day[day], period)  # nets sum to zero
        checked = await on_every_district(cluster, "check", "--period", period)
        for code, out in checked.items():
            assert "PROBLEM" not in out, out
            sent = sum(1 for t in by_day[day] if t.serving == code)
            assert checked_counts(out) == (sent, sent, 0), (code, period, out)

    # The week's money by hand: the fare change is in the claims (a plain bus ride by
    # sample-2 claims 300, by sample-1 200).
    assert expected_claim(liable) == NEW_BUS_FEN
    assert expected_claim(SentTrip(RONGCHANG, grace, True)) == 200

    # A trip of D1 uploaded now is too late.
    too_late = record(cluster, DAZU, "d1-too-late", pools[ANYUE][0], Scene.BUS, at(d1, 12), None)
    results = await submit(cluster, DAZU, [too_late])
    assert [r.reason for r in results] == ["too_late"], results
