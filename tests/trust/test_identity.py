"""SPIFFE IDs of nodes and operators: parsing, refusing every other form, and the call's identity.

Module under test: :mod:`broker.trust.identity`.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from broker.core.errors import Unauthenticated
from broker.trust.config import node_server_name
from broker.trust.identity import (
    Identity,
    Role,
    bind_identity,
    current_identity,
    node_identity,
    operator_identity,
    parse_spiffe_id,
    unbind_identity,
)

D = "500111"
OP_63 = "a" + "b-" * 31  # 63 characters, the longest id a DNS label can carry


def test_a_node_id_parses_to_its_district_and_role():
    ident = parse_spiffe_id("spiffe://500111.yikatong.cy/node")
    assert ident == Identity("500111", Role.NODE)
    assert ident.operator_id == ""


def test_an_operator_id_parses_to_its_district_role_and_operator():
    ident = parse_spiffe_id("spiffe://512021.yikatong.cy/operator/bus-01")
    assert ident == Identity("512021", Role.OPERATOR, "bus-01")


@pytest.mark.parametrize("op", ["a", "0", "9-", "bus-01", OP_63])
def test_operator_ids_at_the_edges_of_the_allowed_form_parse(op: str):
    """1 to 63 characters of [a-z0-9-], starting alphanumeric (a trailing dash is allowed)."""
    assert parse_spiffe_id(f"spiffe://{D}.yikatong.cy/operator/{op}").operator_id == op


@pytest.mark.parametrize("district", ["100000", "899999", "500111"])
def test_district_codes_from_1_to_8_parse(district: str):
    assert parse_spiffe_id(f"spiffe://{district}.yikatong.cy/node").district == district


@pytest.mark.parametrize(
    "uri",
    [
        # scheme
        "https://500111.yikatong.cy/node",
        "SPIFFE://500111.yikatong.cy/node",
        "spiffe:/500111.yikatong.cy/node",
        "500111.yikatong.cy/node",
        # trust domain
        "spiffe://500111.yikatong.com/node",
        "spiffe://500111.yikatong.cy.evil.example/node",
        "spiffe://500111.evil.yikatong.cy/node",
        "spiffe://x.500111.yikatong.cy/node",
        "spiffe://500111yikatong.cy/node",
        "spiffe://500111.yikatongXcy/node",
        "spiffe://500111.YIKATONG.CY/node",
        "spiffe://500111.yikatong.cy:443/node",
        "spiffe://user@500111.yikatong.cy/node",
        # district code
        "spiffe://000111.yikatong.cy/node",
        "spiffe://900111.yikatong.cy/node",
        "spiffe://50011.yikatong.cy/node",
        "spiffe://5001111.yikatong.cy/node",
        "spiffe://50011a.yikatong.cy/node",
        "spiffe://.yikatong.cy/node",
        "spiffe://５００１１１.yikatong.cy/node",  # full-width digits
        # path
        "spiffe://500111.yikatong.cy/",
        "spiffe://500111.yikatong.cy",
        "spiffe://500111.yikatong.cy/node/",
        "spiffe://500111.yikatong.cy/node/extra",
        "spiffe://500111.yikatong.cy/nodes",
        "spiffe://500111.yikatong.cy/Node",
        "spiffe://500111.yikatong.cy//node",
        "spiffe://500111.yikatong.cy/node?x=1",
        "spiffe://500111.yikatong.cy/node#frag",
        "spiffe://500111.yikatong.cy/admin",
        "spiffe://500111.yikatong.cy/operator",
        "spiffe://500111.yikatong.cy/operator/",
        "spiffe://500111.yikatong.cy/operators/bus-01",
        "spiffe://500111.yikatong.cy/operator/bus-01/",
        "spiffe://500111.yikatong.cy/operator/bus-01/x",
        "spiffe://500111.yikatong.cy/operator/bus-01/node",
        "spiffe://500111.yikatong.cy/node/operator/bus-01",
        # operator id
        "spiffe://500111.yikatong.cy/operator/Bus-01",
        "spiffe://500111.yikatong.cy/operator/BUS",
        "spiffe://500111.yikatong.cy/operator/-bus",
        "spiffe://500111.yikatong.cy/operator/bus_01",
        "spiffe://500111.yikatong.cy/operator/bus.01",
        "spiffe://500111.yikatong.cy/operator/bus%2D01",
        "spiffe://500111.yikatong.cy/operator/bus 01",
        "spiffe://500111.yikatong.cy/operator/bús",
        f"spiffe://500111.yikatong.cy/operator/{OP_63}x",  # 64 characters
        # whitespace and control characters around a good id
        " spiffe://500111.yikatong.cy/node",
        "spiffe://500111.yikatong.cy/node ",
        "spiffe://500111.yikatong.cy/node\n",
        "spiffe://500111.yikatong.cy/node\x00",
        "",
    ],
)
def test_every_other_form_is_refused(uri: str):
    with pytest.raises(ValueError, match="not a yikatong SPIFFE ID"):
        parse_spiffe_id(uri)


@pytest.mark.parametrize("ident", [node_identity("512021"), operator_identity("512021", OP_63)])
def test_spiffe_id_and_parse_round_trip(ident: Identity):
    assert parse_spiffe_id(ident.spiffe_id) == ident


def test_spiffe_ids_are_built_in_the_documented_form():
    assert node_identity(D).spiffe_id == "spiffe://500111.yikatong.cy/node"
    assert operator_identity(D, "bus-01").spiffe_id == "spiffe://500111.yikatong.cy/operator/bus-01"


def test_a_nodes_dns_name_is_the_server_name_peers_check():
    """The DNS SAN put in a node certificate must be the name its peers' channels expect."""
    assert node_identity("512021").dns_name == "node.512021.yikatong.cy"
    assert node_identity("512021").dns_name == node_server_name("512021")


def test_an_operators_dns_name_puts_its_id_under_its_district():
    assert operator_identity(D, "bus-01").dns_name == "bus-01.operator.500111.yikatong.cy"
    # The longest operator id still fits one DNS label (63 octets).
    label = operator_identity(D, OP_63).dns_name.split(".")[0]
    assert len(label) == 63


def test_node_and_operator_identities_differ_and_have_their_roles():
    node, op = node_identity(D), operator_identity(D, "node")
    assert node.role is Role.NODE and op.role is Role.OPERATOR
    assert node != op  # an operator called "node" is not the node
    assert node.spiffe_id != op.spiffe_id and node.dns_name != op.dns_name


@pytest.mark.parametrize(
    "op", ["", "-bus", "Bus-01", "bus_01", "bus.01", "bus 01", "bus/01", "bus\n", OP_63 + "x"]
)
def test_operator_identity_refuses_a_malformed_operator_id(op: str):
    with pytest.raises(ValueError, match="operator id"):
        operator_identity(D, op)


@pytest.mark.parametrize("district", ["", "50011", "5001110", "000111", "../x", "abcdef"])
def test_identities_refuse_a_district_that_is_no_division_code(district: str):
    """An identity whose SPIFFE ID no node would parse must not be made (nor issued)."""
    with pytest.raises(ValueError):
        node_identity(district)
    with pytest.raises(ValueError):
        operator_identity(district, "bus-01")


def test_identities_are_immutable_and_hashable():
    ident = operator_identity(D, "bus-01")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ident.operator_id = "bus-02"  # type: ignore[misc]
    assert {ident, operator_identity(D, "bus-01")} == {ident}


def test_role_values_are_the_path_words():
    assert Role("node") is Role.NODE and Role("operator") is Role.OPERATOR


def test_no_identity_outside_a_call_is_unauthenticated():
    with pytest.raises(Unauthenticated):
        current_identity()


def test_a_bound_identity_is_current_until_unbound_and_nesting_restores_the_outer():
    outer, inner = node_identity("512021"), operator_identity(D, "bus-01")
    t1 = bind_identity(outer)
    try:
        assert current_identity() == outer
        t2 = bind_identity(inner)
        assert current_identity() == inner
        unbind_identity(t2)
        assert current_identity() == outer
    finally:
        unbind_identity(t1)
    with pytest.raises(Unauthenticated):
        current_identity()


async def test_concurrent_calls_each_see_only_their_own_identity():
    """Servicers run as concurrent tasks: one call's identity must never leak into another's."""
    seen: dict[str, Identity] = {}
    both_bound = asyncio.Barrier(2)

    async def call(name: str, ident: Identity) -> None:
        token = bind_identity(ident)
        try:
            await both_bound.wait()  # the other task has bound its identity by now
            seen[name] = current_identity()
        finally:
            unbind_identity(token)

    a, b = node_identity("512021"), operator_identity(D, "bus-01")
    await asyncio.gather(call("a", a), call("b", b))
    assert seen == {"a": a, "b": b}
    with pytest.raises(Unauthenticated):
        current_identity()  # nothing leaked into the test's own context either
