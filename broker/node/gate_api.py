"""Gate.Check: an operator of this district asks whether a card may pass."""

from __future__ import annotations

import os

import grpc

from broker._proto.yikatong.v1 import gate_pb2, gate_pb2_grpc
from broker.cards.wire import card_from_wire, scene_from_wire
from broker.gate.service import GateService
from broker.gate.wire import decision_to_wire
from broker.node.fields import short_id


class GateServicer(gate_pb2_grpc.GateServicer):
    """``yikatong.v1.Gate``: this district's operators check cards at their gates."""

    def __init__(self, gate: GateService) -> None:
        self._gate = gate

    async def Check(
        self, request: gate_pb2.GateCheckRequest, context: grpc.aio.ServicerContext
    ) -> gate_pb2.GateDecision:
        ref = card_from_wire(request.card, request.HasField("card"))
        scene = scene_from_wire(request.scene)
        short_id(request.gate_id, "gate_id", required=True)
        place = short_id(request.place_id, "place_id", required=False)
        decision = await self._gate.check(
            ref, scene, os.urandom(8).hex(), request.operator_id, place
        )
        return decision_to_wire(decision)
