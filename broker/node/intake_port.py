"""The intake port: trips uploaded straight to the intake's worker process, never to the node.

Receiving a 10,000-trip ``SubmitTrips`` (about 0.8 MB) costs the process that
receives it about 4-12 ms of CPU (beyond its idle background; measured per
thread): TLS and HTTP/2 in gRPC's threads, and two steps of its event loop,
1-9 ms each, taking the message in and the answer out (scripts/bench-gate-load
--profile; asyncio's slow-callback log). In the node's process every gate
check waits behind those steps. Started with an intake address
(``Node.start(..., intake_listen=...)``), the node hands an :class:`IntakePort`
to its :class:`~broker.settlement.intake.TripIntake`, whose worker process
(``SCHED_IDLE``, see :mod:`broker.core.priority`) then serves
``yikatong.v1.Settlement``'s ``SubmitTrips`` and ``GetTripOutcomes`` on that
address itself, on a thread and event loop of its own.

The same trust as the node's port: the node's certificate and key, the client
CA bundles and revocation lists (re-read when their files change, every
``[tls] reload_interval_ms``, as the node does), the same access rules and the
same guard (:class:`~broker.node.guard.AuthInterceptor`): a caller must be an
operator of this district, ``GetTripOutcomes``' ``operator_id`` must be the
caller's own, and ``SubmitTrips`` records the trips as the certificate's
operator's. Its latencies are recorded in the worker's own
:class:`~broker.node.metrics.Metrics`. Any other method of the service is
UNIMPLEMENTED there. Trips are judged at the worker's wall clock.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing import util

import grpc
import structlog

from broker._proto.yikatong.v1 import settlement_pb2_grpc
from broker.core.errors import ConfigError
from broker.node.config import NodeConfig
from broker.node.guard import AuthInterceptor, GuardedServer
from broker.node.metrics import Metrics
from broker.node.settlement_api import UNDECODED, TripsServicer
from broker.settlement.intake import Trips
from broker.trust.access import AccessPolicy
from broker.trust.store import TrustStore
from broker.trust.tls import CallerVerifier, ServerCertificates

log = structlog.get_logger(__name__)

START_TIMEOUT_S = 30.0
STOP_GRACE_S = 1.0


def port_options(cfg: NodeConfig) -> list[tuple[str, int]]:
    """Connections are aged as on the node's port: a rotated-out or revoked operator cannot
    stay on one. An upload is a unary call: a short grace finishes the one under way."""
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.max_connection_age_ms", cfg.tls.max_connection_age_s * 1000),
        ("grpc.max_connection_age_grace_ms", 60_000),
    ]


@dataclass(frozen=True)
class IntakePort:
    """A :class:`~broker.settlement.intake.Listener`: serves ``trips`` on ``address``
    (``host:port``) from a thread of the calling (worker) process.

    Pickled to the worker, so it holds only the node's configuration and the address.
    """

    config: NodeConfig
    address: str

    def __call__(self, trips: Trips) -> int:
        address = self.address
        bound: Future[int] = Future()
        server = _PortServer(self.config, address, trips, bound)
        thread = threading.Thread(target=server.run, name="intake-port", daemon=True)
        thread.start()
        port = bound.result(timeout=START_TIMEOUT_S)
        # At the worker's exit (the node's intake closing), finish the calls under way.
        util.Finalize(server, server.stop, args=(thread,), exitpriority=10)
        return port


class _PortServer:
    """The intake port's server and its trust, on their own event loop."""

    def __init__(self, cfg: NodeConfig, address: str, trips: Trips, bound: Future[int]) -> None:
        self._cfg = cfg
        self._address = address
        self._trips = trips
        self._bound = bound
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to whoever waits for the port
            if not self._bound.done():
                self._bound.set_exception(exc)
            else:
                log.error("intake_port_failed", exc_info=exc)

    def stop(self, thread: threading.Thread) -> None:
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stopping.set)
            thread.join(timeout=STOP_GRACE_S + 2)

    async def _serve(self) -> None:
        cfg = self._cfg
        clock: Callable[[], datetime] = lambda: datetime.now(UTC)  # noqa: E731
        trust = TrustStore(cfg, clock)
        policy = AccessPolicy(cfg.district, frozenset(p.district for p in cfg.peers), cfg.access)
        verifier = CallerVerifier(trust)
        guard = AuthInterceptor(
            verifier, policy, Metrics(), cfg.tls.min_version, clock, undecoded=UNDECODED
        )
        server = grpc.aio.server(options=port_options(cfg))
        guarded = GuardedServer(server, guard)
        settlement_pb2_grpc.add_SettlementServicer_to_server(TripsServicer(self._trips), guarded)
        guarded.check_complete()
        try:
            port = server.add_secure_port(self._address, ServerCertificates(trust).credentials())
        except RuntimeError as exc:
            await server.stop(None)
            raise ConfigError(f"cannot listen on {self._address}: {exc}") from exc
        await server.start()
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._bound.set_result(port)
        try:
            await self._watch_trust(trust, guard, self._stopping)
        finally:
            await server.stop(STOP_GRACE_S)

    async def _watch_trust(
        self, trust: TrustStore, guard: AuthInterceptor, stopping: asyncio.Event
    ) -> None:
        """Re-read certificates, bundles and revocation lists when their files change (the
        node's files: the node rewrites them), until the port stops."""
        interval = self._cfg.tls.reload_interval_ms / 1000
        while not stopping.is_set():
            try:
                async with asyncio.timeout(interval):
                    await stopping.wait()
            except TimeoutError:
                pass
            if (trust.changed() or trust.too_old()) and await asyncio.to_thread(trust.reload):
                guard.end_refused_streams()
