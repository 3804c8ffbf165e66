"""Gate.Check's servicer (broker/node/gate_api.py) through a running node.

tests/e2e/test_gate.py covers the decisions themselves and a malformed card, scene or empty
gate_id; here: what the servicer adds — the id checks at their bounds, the optional
place_id reaching the fare rules, and the operator checked before anything else.
"""

from __future__ import annotations

from datetime import datetime

import grpc
import pytest

from broker._proto.yikatong.v1 import gate_pb2, gate_pb2_grpc, types_pb2
from broker.cards.model import CardRef
from broker.testbed.build import DistrictSetup
from tests.conftest import DAZU, Cluster
from tests.helpers import channel, check_request, import_lines, ssn_for

ADULT = CardRef(DAZU, "ADULT0000001")
PLACE_RULE = """
[[table.rule]]
scene = "bus"
place = "route-9"
gross_fare_fen = 300
"""


@pytest.fixture
def districts(districts: dict[str, DistrictSetup]) -> dict[str, DistrictSetup]:
    """The testbed, with one Dazu bus route dearer than the rest (rules read at node start)."""
    fares = districts[DAZU].config.fares.file
    assert fares is not None
    fares.write_text(fares.read_text() + PLACE_RULE)
    return districts


async def call(
    cluster: Cluster, request: gate_pb2.GateCheckRequest
) -> gate_pb2.GateDecision | grpc.aio.AioRpcError:
    """One Gate.Check as Dazu's operator; the decision, or the error it got."""
    s = cluster.setups[DAZU]
    ch = channel(
        cluster.nodes[DAZU].address,
        DAZU,
        s.paths.ca_cert.read_bytes(),
        s.operator_cert.read_bytes(),
        s.operator_key.read_bytes(),
    )
    try:
        return await gate_pb2_grpc.GateStub(ch).Check(request, timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc
    finally:
        await ch.close()


def request(
    gate_id: str = "g1", place_id: str = "", **changes: object
) -> gate_pb2.GateCheckRequest:
    r = check_request(ADULT, "transit-01", types_pb2.SCENE_BUS, gate_id)
    r.place_id = place_id
    for name, value in changes.items():
        setattr(r, name, value)
    return r


async def test_a_check_is_answered_and_priced_at_its_place(cluster: Cluster, now: datetime) -> None:
    """place_id is optional, and when given it reaches the fare rules (a dearer route)."""
    import_lines(
        cluster.setups[DAZU],
        [f"ADULT0000001,{ssn_for(DAZU, '19900101')},active,false,false,2035-01-01"],
        now,
    )
    anywhere = await call(cluster, request())
    assert isinstance(anywhere, gate_pb2.GateDecision)
    assert anywhere.allow and anywhere.status == types_pb2.CARD_STATUS_ACTIVE
    assert anywhere.source == types_pb2.DECISION_SOURCE_HOME
    assert (anywhere.gross_fare_fen, anywhere.charged_fen, anywhere.fare_version) == (
        200,
        200,
        "sample-1",
    )
    route9 = await call(cluster, request(place_id="route-9"))
    assert isinstance(route9, gate_pb2.GateDecision)
    assert (route9.gross_fare_fen, route9.charged_fen) == (300, 300)
    longest = await call(cluster, request(gate_id="g" * 64, place_id="p" * 64))
    assert isinstance(longest, gate_pb2.GateDecision) and longest.gross_fare_fen == 200


BAD_IDS = [
    (request(gate_id="g" * 65), "gate_id"),
    (request(gate_id="gate\n1"), "gate_id"),
    (request(place_id="p" * 65), "place_id"),
    (request(place_id="route\x009"), "place_id"),
]


async def test_an_overlong_or_unprintable_id_is_invalid_argument_naming_it(
    cluster: Cluster,
) -> None:
    for bad, field in BAD_IDS:  # one node for every case: starting one costs more than a call
        err = await call(cluster, bad)
        assert isinstance(err, grpc.aio.AioRpcError), bad
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert (err.details() or "").startswith(field + ":"), err.details()


async def test_the_operator_is_checked_before_the_request_is(cluster: Cluster) -> None:
    """Another operator's id with no card at all: refused for the operator, not the card."""
    bad_card = request(operator_id="someone-else")
    bad_card.ClearField("card")
    err = await call(cluster, bad_card)
    assert isinstance(err, grpc.aio.AioRpcError)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "operator_id" in (err.details() or "")
