"""The gate service (broker.gate.service): where an answer comes from, and how it is priced.

The home recognizer and the peer answers are plain fakes: this is a unit test of the
routing, offline policy and pricing around them.
"""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime
from typing import cast

import pytest

from broker.cards.model import CardRef, CardStatus, DecisionSource, Entitlement, Recognition, Scene
from broker.core.errors import PeerUnavailable
from broker.fares.rules import NO_FARE, FareSchedule, parse_fares
from broker.gate.config import OfflineConfig
from broker.gate.decision import ALLOW_STANDARD_FARE, DENY
from broker.gate.home import HomeRecognizer
from broker.gate.service import GateService

HERE, PEER = "500111", "512021"
E = Entitlement
NOW = datetime(2026, 11, 28, 4, 0, tzinfo=UTC)
SENIOR = Recognition(CardStatus.ACTIVE, (E.SENIOR_60, E.SENIOR_65), 120)
STUDENT = Recognition(CardStatus.ACTIVE, (E.STUDENT,), 120)
LOST = Recognition(CardStatus.LOST, (), 120)

# Like SAMPLE_FARES in broker/testbed/build.py, with a second dated table, an operator's own
# rule and a place's own rule.
FARES = """
district = "500111"

[[table]]
version = "2026.01"
effective_from = "2026-01-01"
[[table.rule]]
scene = "bus"
gross_fare_fen = 150

[[table]]
version = "2026.11"
effective_from = "2026-11-01"
[[table.rule]]
scene = "bus"
gross_fare_fen = 200
concessions = [
  { entitlement = "senior_65", kind = "free", scheme = "senior-bus-free" },
  { entitlement = "senior_60", kind = "percent", value_bp = 5000, scheme = "senior-bus-half" },
  { entitlement = "student", kind = "fixed", value_fen = 100, scheme = "student-bus" },
]
[[table.rule]]
scene = "bus"
place = "route-205"
gross_fare_fen = 300
concessions = [
  { entitlement = "student", kind = "fixed", value_fen = 50, scheme = "student-bus" },
]
[[table.rule]]
operator = "rock-carvings"
scene = "scenic_area"
gross_fare_fen = 11500
concessions = [
  { entitlement = "senior_60", kind = "percent", value_bp = 5000, scheme = "scenic-senior" },
]
"""


class FakeHome:
    """Stands in for HomeRecognizer: one fixed answer, records what it was asked."""

    def __init__(self, answer: Recognition) -> None:
        self.answer = answer
        self.asked: list[tuple[CardRef, datetime]] = []

    async def recognise(self, ref: CardRef, now: datetime) -> Recognition:
        self.asked.append((ref, now))
        return self.answer


class FakePeers:
    """Stands in for PeerRecognizer: an optional in-process hit, then a fixed answer or error."""

    def __init__(
        self,
        hit: Recognition | None = None,
        answer: tuple[Recognition, DecisionSource] = (SENIOR, DecisionSource.PEER),
        error: Exception | None = None,
    ) -> None:
        self.hit = hit
        self.answer = answer
        self.error = error
        self.looked_up: list[CardRef] = []
        self.asked: list[tuple[CardRef, Scene, str]] = []

    def cached(self, ref: CardRef) -> Recognition | None:
        self.looked_up.append(ref)
        return self.hit

    async def recognise(
        self, ref: CardRef, scene: Scene, request_id: str
    ) -> tuple[Recognition, DecisionSource]:
        self.asked.append((ref, scene, request_id))
        if self.error is not None:
            raise self.error
        return self.answer


@pytest.fixture
def fares() -> FareSchedule:
    return parse_fares(tomllib.loads(FARES))


def service(
    home: FakeHome | None = None,
    peers: FakePeers | None = None,
    fares: FareSchedule | None = None,
    now: datetime = NOW,
    offline_policy: OfflineConfig | None = None,
) -> GateService:
    return GateService(
        HERE,
        cast(HomeRecognizer, home or FakeHome(SENIOR)),
        peers or FakePeers(),
        clock=lambda: now,
        fares=fares,
        offline_policy=offline_policy,
    )


async def test_own_district_cards_are_answered_at_home():
    """A card of this district goes to the registry (HOME) at the clock's instant; no peer."""
    home, peers = FakeHome(SENIOR), FakePeers()
    ref = CardRef(HERE, "C5001110000001")
    d = await service(home, peers).check(ref, Scene.BUS, "r1")
    assert (d.allow, d.source, d.entitlements) == (True, DecisionSource.HOME, SENIOR.entitlements)
    assert home.asked == [(ref, NOW)]
    assert peers.looked_up == [] and peers.asked == []


async def test_a_refused_home_card_is_refused():
    """A LOST own card: refused, from HOME."""
    d = await service(FakeHome(LOST)).check(CardRef(HERE, "C5001110000002"), Scene.BUS, "r1")
    assert (d.allow, d.status, d.source) == (False, CardStatus.LOST, DecisionSource.HOME)


async def test_a_cached_answer_is_used_without_asking_the_peer():
    """An in-process hit decides at once (CACHE); neither home nor peer is asked."""
    home, peers = FakeHome(SENIOR), FakePeers(hit=STUDENT)
    d = await service(home, peers).check(CardRef(PEER, "C5120210000001"), Scene.BUS, "r1")
    assert (d.allow, d.source, d.entitlements) == (True, DecisionSource.CACHE, (E.STUDENT,))
    assert peers.asked == [] and home.asked == []


async def test_a_cached_refusal_is_still_a_refusal():
    """A cached LOST answer is refused, not passed because it came from the cache."""
    d = await service(peers=FakePeers(hit=LOST)).check(CardRef(PEER, "C1"), Scene.BUS, "r1")
    assert (d.allow, d.status, d.source) == (False, CardStatus.LOST, DecisionSource.CACHE)


async def test_otherwise_the_peer_is_asked_with_scene_and_request_id():
    """No hit: the peer answers (PEER); the scene and request id are passed on unchanged."""
    home, peers = FakeHome(SENIOR), FakePeers(answer=(STUDENT, DecisionSource.PEER))
    ref = CardRef(PEER, "C5120210000001")
    d = await service(home, peers).check(ref, Scene.MUSEUM, "req-42")
    assert (d.allow, d.source, d.entitlements) == (True, DecisionSource.PEER, (E.STUDENT,))
    assert peers.asked == [(ref, Scene.MUSEUM, "req-42")]
    assert home.asked == []


async def test_the_recognizers_source_is_carried_through():
    """An answer the recognizer found in Redis is reported CACHE, not PEER."""
    peers = FakePeers(answer=(SENIOR, DecisionSource.CACHE))
    d = await service(peers=peers).check(CardRef(PEER, "C1"), Scene.BUS, "r1")
    assert d.source is DecisionSource.CACHE


async def test_an_unavailable_peer_is_an_offline_refusal(fares: FareSchedule):
    """PeerUnavailable: refused, UNKNOWN, OFFLINE_POLICY, the error as reason, and no fare."""
    err = PeerUnavailable(PEER, "did not answer within 300 ms")
    ref = CardRef(PEER, "C5120210000001")
    d = await service(peers=FakePeers(error=err), fares=fares).check(ref, Scene.BUS, "r1")
    assert (d.allow, d.status, d.source) == (
        False,
        CardStatus.UNKNOWN,
        DecisionSource.OFFLINE_POLICY,
    )
    assert d.entitlements == ()
    assert d.reason == str(err) and PEER in d.reason
    assert ref.card_number not in d.reason
    assert d.price == NO_FARE


async def test_other_errors_are_not_disguised_as_offline_refusals():
    """Only PeerUnavailable means 'offline'; a bug in the recognizer propagates."""
    peers = FakePeers(error=RuntimeError("bug"))
    with pytest.raises(RuntimeError, match="bug"):
        await service(peers=peers).check(CardRef(PEER, "C1"), Scene.BUS, "r1")


async def test_an_allowed_card_is_priced_by_this_districts_rules(fares: FareSchedule):
    """SENIOR_65 on a bus in the 2026.11 table: free, the concession named, version recorded."""
    peers = FakePeers(answer=(SENIOR, DecisionSource.PEER))
    d = await service(peers=peers, fares=fares).check(
        CardRef(PEER, "C1"), Scene.BUS, "r1", operator="bus-01", place="route-1"
    )
    p = d.price
    assert (p.gross_fare_fen, p.charged_fen, p.concession_fen) == (200, 0, 200)
    assert (p.applied_entitlement, p.scheme, p.version) == (
        E.SENIOR_65,
        "senior-bus-free",
        "2026.11",
    )


async def test_operator_and_place_select_the_rule(fares: FareSchedule):
    """The place's own rule (route-205) and the operator's own rule are the ones applied."""
    svc = service(peers=FakePeers(answer=(STUDENT, DecisionSource.PEER)), fares=fares)
    route = await svc.check(CardRef(PEER, "C1"), Scene.BUS, "r1", "bus-01", "route-205")
    assert (route.price.gross_fare_fen, route.price.charged_fen) == (300, 250)
    other = await svc.check(CardRef(PEER, "C1"), Scene.BUS, "r1", "bus-01", "route-1")
    assert (other.price.gross_fare_fen, other.price.charged_fen) == (200, 100)
    senior = service(FakeHome(SENIOR), fares=fares)
    site = await senior.check(CardRef(HERE, "C1"), Scene.SCENIC_AREA, "r1", "rock-carvings")
    assert (site.price.charged_fen, site.price.applied_entitlement) == (5750, E.SENIOR_60)
    nobody = await senior.check(CardRef(HERE, "C1"), Scene.SCENIC_AREA, "r1", "other-op")
    assert nobody.price.gross_fare_fen == 0 and nobody.price.version == "2026.11"


async def test_a_refused_card_is_not_priced(fares: FareSchedule):
    """A LOST card (home or peer) carries NO_FARE even where a rule would price it."""
    home = await service(FakeHome(LOST), fares=fares).check(CardRef(HERE, "C1"), Scene.BUS, "r1")
    peer = await service(peers=FakePeers(answer=(LOST, DecisionSource.PEER)), fares=fares).check(
        CardRef(PEER, "C1"), Scene.BUS, "r1"
    )
    assert home.price == NO_FARE and peer.price == NO_FARE


async def test_without_fare_rules_an_allowed_card_has_no_fare():
    """A node with no fares file prices nothing (fare_version stays empty)."""
    d = await service(FakeHome(SENIOR), fares=None).check(CardRef(HERE, "C1"), Scene.BUS, "r1")
    assert d.allow and d.price == NO_FARE


async def test_before_the_first_table_an_allowed_card_has_no_fare(fares: FareSchedule):
    """No table in force yet (2025): the decision stands, unpriced."""
    early = datetime(2025, 6, 1, 4, 0, tzinfo=UTC)
    d = await service(FakeHome(SENIOR), fares=fares, now=early).check(
        CardRef(HERE, "C1"), Scene.BUS, "r1"
    )
    assert d.allow and d.price == NO_FARE


@pytest.mark.parametrize(
    ("instant", "version", "gross"),
    [
        (datetime(2026, 10, 31, 15, 59, 59, tzinfo=UTC), "2026.01", 150),  # 23:59:59 on 31 Oct
        (datetime(2026, 10, 31, 16, 0, 0, tzinfo=UTC), "2026.11", 200),  # 00:00 on 1 Nov
    ],
)
async def test_the_fare_table_is_chosen_by_the_shanghai_day(
    fares: FareSchedule, instant: datetime, version: str, gross: int
):
    """A table effective 1 November applies from midnight in Shanghai (16:00 UTC the day before)."""
    d = await service(FakeHome(STUDENT), fares=fares, now=instant).check(
        CardRef(HERE, "C1"), Scene.BUS, "r1"
    )
    assert (d.price.version, d.price.gross_fare_fen) == (version, gross)


async def test_where_the_scene_allows_it_an_unverified_card_pays_the_standard_fare(
    fares: FareSchedule,
):
    """A bus (allow_standard_fare): through, the full fare charged, no concession,
    unverified; a museum (deny): refused."""
    err = PeerUnavailable(PEER, "did not answer within 300 ms")
    ref = CardRef(PEER, "C5120210000001")
    policy = OfflineConfig({"bus": ALLOW_STANDARD_FARE, "museum": DENY})
    gate = service(peers=FakePeers(error=err), fares=fares, offline_policy=policy)
    bus = await gate.check(ref, Scene.BUS, "r1", operator="op-1")
    assert (bus.allow, bus.verified, bus.source) == (True, False, DecisionSource.OFFLINE_POLICY)
    assert bus.price.gross_fare_fen > 0 and bus.price.charged_fen == bus.price.gross_fare_fen
    assert bus.price.concession_fen == 0
    museum = await gate.check(ref, Scene.MUSEUM, "r2")
    assert (museum.allow, museum.verified) == (False, False)
