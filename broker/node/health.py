"""``grpc.health.v1.Health`` with per-component detail for this district only.

The overall status (``""``) and the service names (``yikatong.v1.Gate`` …)
are for anyone allowed to call Health: load balancers, monitoring, peers.
Component names — ``yikatong.trust.crl``, ``yikatong.trust.peer.<code>``,
``yikatong.ledger``, ``yikatong.redis``, ``yikatong.task.<name>`` — say how
this node is doing inside; only its own node and its own back-office staff
(``spiffe://<code>.yikatong.cy/admin/<id>``) see them. Anyone else asking
for one is told it does not exist (NOT_FOUND / SERVICE_UNKNOWN), the same
answer as for a name that really does not.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from broker.core.errors import Unauthenticated
from broker.trust.identity import Role, current_identity

COMPONENT_PREFIX = "yikatong."
SERVICE_PREFIX = "yikatong.v1."  # the services themselves are public
Status = int  # a health_pb2.HealthCheckResponse.ServingStatus value


class ComponentHealth(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """Wraps grpc's health servicer; filters component names by caller."""

    def __init__(self, district: str) -> None:
        self._district = district
        self._inner = health.aio.HealthServicer()
        self._statuses: dict[str, Status] = {}

    async def set(self, name: str, status: Status) -> None:
        self._statuses[name] = status
        await self._inner.set(name, status)

    def status(self, name: str) -> Status | None:
        """The status last set for ``name`` (for the node itself and tests)."""
        return self._statuses.get(name)

    async def enter_graceful_shutdown(self) -> None:
        for name in self._statuses:
            self._statuses[name] = health_pb2.HealthCheckResponse.NOT_SERVING
        await self._inner.enter_graceful_shutdown()

    def _visible(self, name: str) -> bool:
        if not name.startswith(COMPONENT_PREFIX) or name.startswith(SERVICE_PREFIX):
            return True
        try:
            ident = current_identity()
        except Unauthenticated:  # called in-process (the guard binds every remote caller)
            return True
        return ident.district == self._district and ident.role in (Role.NODE, Role.ADMIN)

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        if not self._visible(request.service):
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return await self._inner.Check(request, context)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> None:
        if not self._visible(request.service):
            unknown = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            await context.write(health_pb2.HealthCheckResponse(status=unknown))
            return
        await self._inner.Watch(request, context)

    async def List(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        statuses = {
            name: health_pb2.HealthCheckResponse(status=status)
            for name, status in self._statuses.items()
            if self._visible(name)
        }
        return health_pb2.HealthListResponse(statuses=statuses)
