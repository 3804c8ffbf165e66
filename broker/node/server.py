"""A district node: its parts wired together from a :class:`NodeConfig`, served over mutual TLS."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from broker._proto.yikatong.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    gate_pb2,
    gate_pb2_grpc,
    recognition_pb2,
    recognition_pb2_grpc,
    settlement_pb2,
    settlement_pb2_grpc,
    trust_pb2,
    trust_pb2_grpc,
)
from broker.cards.mirror import CardCopy
from broker.cards.privacy import load_key_file
from broker.cards.registry import Registry
from broker.core.errors import ConfigError
from broker.core.priority import keep_off, keep_to
from broker.fares.rules import load_fares
from broker.gate.cache import AnswerCache
from broker.gate.home import HomeRecognizer
from broker.gate.push import HandleBook, StatusFeed
from broker.gate.recognizer import PeerRecognizer
from broker.gate.service import GateService
from broker.gate.watch import StatusWatcher
from broker.node.admin_api import CardAdminServicer
from broker.node.config import NodeConfig
from broker.node.gate_api import GateServicer
from broker.node.guard import AuthInterceptor, GuardedServer
from broker.node.health import ComponentHealth
from broker.node.intake_port import IntakePort
from broker.node.metrics import Metrics
from broker.node.recognition_api import RecognitionServicer
from broker.node.settlement_api import UNDECODED, SettlementServicer
from broker.node.supervisor import Supervisor
from broker.node.trust_api import TrustServicer
from broker.peers.bundles import BundleRefresher
from broker.peers.channels import PeerChannels
from broker.peers.client import PeerClient
from broker.settlement.clearing.sender import EXCHANGE_TIMEOUT_S
from broker.settlement.clearing.service import ClearingService
from broker.settlement.intake import IntakeSpec, TripIntake
from broker.trust.access import AccessPolicy
from broker.trust.store import TrustStore, peer_health_name
from broker.trust.tls import CallerVerifier, ServerCertificates

log = structlog.get_logger(__name__)

SWITCH_INTERVAL_S = 0.0005

SERVICE_NAMES = (
    gate_pb2.DESCRIPTOR.services_by_name["Gate"].full_name,
    recognition_pb2.DESCRIPTOR.services_by_name["Recognition"].full_name,
    trust_pb2.DESCRIPTOR.services_by_name["Trust"].full_name,
    settlement_pb2.DESCRIPTOR.services_by_name["Settlement"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["CardAdmin"].full_name,
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    reflection.SERVICE_NAME,
)


# A call running when its connection is aged out may take this long to finish: an
# exchange's deadline, so one started just before the GOAWAY is not cut off.
STREAM_GRACE_MS = int(EXCHANGE_TIMEOUT_S * 1000)


def server_options(cfg: NodeConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        # Connections are recycled, so a rotated-out or revoked caller cannot stay on one:
        # after the GOAWAY no new call starts on the old connection (the client opens a new
        # one), and the calls on it get as long as the longest batch exchange to finish. A
        # revoked caller's stream does not wait for that: it is ended at the next trust
        # change (AuthInterceptor.end_refused_streams).
        ("grpc.max_connection_age_ms", cfg.tls.max_connection_age_s * 1000),
        ("grpc.max_connection_age_grace_ms", STREAM_GRACE_MS),
    ]


COMPONENT_CHECK_S = 5.0  # how often the ledger and Redis are pinged for health
INTAKE_CHECK_S = 5.0  # how soon a worker that died is replaced while it serves the intake port


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Node:
    """A running district node. Build it with :meth:`start`; stop it with :meth:`stop`."""

    config: NodeConfig
    server: grpc.aio.Server
    port: int
    registry: Registry
    cache: AnswerCache
    channels: PeerChannels
    peers: PeerRecognizer
    gate: GateService
    metrics: Metrics
    health: ComponentHealth
    trust: TrustStore
    _reload_now: asyncio.Event
    _clock: Callable[[], datetime]
    intake: TripIntake | None = None
    clearing: ClearingService | None = None
    refresher: BundleRefresher | None = None
    guard: AuthInterceptor | None = None
    supervisor: Supervisor = field(default_factory=Supervisor)
    _components: dict[str, bool] = field(default_factory=dict)
    book: HandleBook | None = None
    feed: StatusFeed | None = None
    watchers: dict[str, StatusWatcher] = field(default_factory=dict)
    admin: CardAdminServicer | None = None
    home: HomeRecognizer | None = None
    intake_listen: str | None = None
    cpus_before: frozenset[int] | None = None  # this process's CPUs before the node placed it

    @classmethod
    async def start(
        cls,
        cfg: NodeConfig,
        clock: Callable[[], datetime] = utc_now,
        intake_listen: str | None = None,
    ) -> Node:
        """Open the node's stores, bind its port and start serving.

        ``intake_listen``: ``host:port`` of the intake port, where the trip
        intake's worker process serves ``SubmitTrips`` and ``GetTripOutcomes``
        itself (:mod:`broker.node.intake_port`), so that uploads never enter
        this process; the node's own port answers them too. ``None``: no such
        port. Only for a node that keeps trips (``[ledger]``).

        With ``settlement.worker_cpus`` this process (every thread) first keeps
        off those CPUs, before anything is opened; a failed start, and
        :meth:`stop`, put it back. One placed node per process: a second one
        would find the workers' CPUs already left.
        """
        before = None
        if cfg.settlement.worker_cpus:
            try:
                before = keep_off(cfg.settlement.worker_cpus)
            except ConfigError as exc:
                raise ConfigError(f"settlement.worker_cpus: {exc}") from exc
        try:
            node = await cls._open(cfg, clock, intake_listen)
        except BaseException:
            if before is not None:
                keep_to(before)
            raise
        node.cpus_before = before
        return node

    @classmethod
    async def _open(
        cls, cfg: NodeConfig, clock: Callable[[], datetime], intake_listen: str | None
    ) -> Node:
        # The event loop answers gates while worker threads (trust reloads, clearing steps)
        # run: let it take the interpreter lock after 0.5 ms of their work, not the default 5.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        hasher = load_key_file(cfg.privacy.hash_key_file)
        trust = TrustStore(cfg, clock)
        registry = Registry(cfg.registry)
        # What settlement judges by: how long an answer may be used (TTL, then stale).
        registry.record_advertised_ttl(cfg.recognition.reach_seconds, clock())
        copy = None
        if cfg.registry.on_postgres:  # gates read a copy in memory, kept current by the log
            copy = CardCopy(cfg.registry)
            await asyncio.to_thread(copy.load)
            copy.start()
        home = HomeRecognizer(cfg.district, registry, cfg.recognition, copy)
        # Pushed status changes: peers' handles, and the feed of WatchStatus streams.
        book = HandleBook(cfg.registry)
        feed = StatusFeed(
            cfg.registry, clock, retention=timedelta(hours=cfg.registry.event_retention_hours)
        )
        cache = AnswerCache.from_config(cfg.cache, cfg.district, clock)
        channels = PeerChannels(trust, cfg.peers)
        reload_now = asyncio.Event()
        refresher = BundleRefresher(cfg, channels, trust, reload_now.set)
        peer_client = PeerClient(channels, cfg.peering.deadline_ms)
        peers = PeerRecognizer(peer_client, cache, hasher, on_failure=refresher.poke)
        # Each process follows each peer home's changes to the answers it caches.
        watchers = {p.district: StatusWatcher(p.district, peer_client, cache) for p in cfg.peers}
        fares = load_fares(cfg.fares.file) if cfg.fares.file else None
        gate = GateService(cfg.district, home, peers, clock, fares, cfg.offline)
        metrics = Metrics()
        policy = AccessPolicy(cfg.district, frozenset(p.district for p in cfg.peers), cfg.access)
        guard = AuthInterceptor(
            CallerVerifier(trust),
            policy,
            metrics,
            cfg.tls.min_version,
            clock,
            undecoded=UNDECODED,  # SubmitTrips' bytes go to the intake's worker process
        )

        server = grpc.aio.server(options=server_options(cfg))
        guarded = GuardedServer(server, guard)
        gate_pb2_grpc.add_GateServicer_to_server(GateServicer(gate), guarded)
        recognition_pb2_grpc.add_RecognitionServicer_to_server(
            RecognitionServicer(
                home, hasher, clock, book, feed, watch_lifetime_s=cfg.tls.max_connection_age_s
            ),
            guarded,
        )
        admin = CardAdminServicer(cfg.registry, clock)
        admin_pb2_grpc.add_CardAdminServicer_to_server(admin, guarded)
        trust_pb2_grpc.add_TrustServicer_to_server(
            TrustServicer(cfg.trust.bundle_file, clock), guarded
        )
        intake = None
        clearing = None
        if cfg.ledger.path is not None or cfg.ledger.url is not None:
            known = frozenset(
                {
                    cfg.district,
                    *(p.district for p in cfg.peers),
                    *(a.district for a in cfg.agreements),
                }
            )
            spec = IntakeSpec(
                cfg.ledger.path,
                cfg.ledger.url,
                cfg.ledger.schema,
                known,
                fares,
                duplicate_window=timedelta(seconds=cfg.settlement.duplicate_window_s),
                changeover_grace=timedelta(seconds=cfg.fares.changeover_grace_s),
                cpus=cfg.settlement.worker_cpus,
            )
            intake = TripIntake(spec, clock)
            if cfg.settlement.key_file is not None:
                clearing = ClearingService(cfg, registry, trust, fares, clock)
            settlement_pb2_grpc.add_SettlementServicer_to_server(
                SettlementServicer(intake, clearing, cfg.settlement), guarded
            )
        health_servicer = ComponentHealth(cfg.district)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, guarded)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(SERVICE_NAMES), guarded
        )
        guarded.check_complete()
        creds = ServerCertificates(trust).credentials()

        async def undo() -> None:
            """Close what was opened above: nothing may outlive a failed start (the
            server's finalizer would otherwise run on a loop long closed)."""
            await server.stop(None)
            book.close()
            await feed.close()
            admin.close()
            home.close()
            registry.close()
            await cache.close()
            await channels.close()
            if intake is not None:
                intake.close()
            if clearing is not None:
                clearing.close()

        try:
            port = server.add_secure_port(cfg.listen, creds)
        except RuntimeError as exc:
            await undo()
            raise ConfigError(f"cannot listen on {cfg.listen}: {exc}") from exc
        await server.start()
        intake_listen = intake_listen or cfg.settlement.intake_listen
        if intake is not None and intake_listen is not None:
            try:  # the worker starts now, and listens: a port it cannot open fails the start
                await intake.listen(IntakePort(cfg, intake_listen))
            except Exception as exc:
                await undo()
                if isinstance(exc, ConfigError):
                    raise
                raise ConfigError(
                    f"cannot serve the intake port on {intake_listen}: {exc}"
                ) from exc
        for name in ("", *SERVICE_NAMES[:5]):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "node_started",
            district=cfg.district,
            port=port,
            intake_port=intake.listen_port if intake is not None else None,
            peers=len(cfg.peers),
            redis=cfg.cache.redis_url is not None,
        )
        node = cls(
            cfg,
            server,
            port,
            registry,
            cache,
            channels,
            peers,
            gate,
            metrics,
            health_servicer,
            trust,
            reload_now,
            clock,
            intake,
            clearing,
            refresher,
            guard,
            book=book,
            feed=feed,
            watchers=watchers,
            home=home,
            admin=admin,
            intake_listen=intake_listen,
        )
        await node._report_trust()
        await node._check_components()
        node.supervisor = Supervisor(on_change=node._set_component)
        node.supervisor.start("trust-watch", node._watch_trust)
        node.supervisor.start("bundle-refresh", refresher.run)
        node.supervisor.start("component-checks", node._watch_components)
        for district, watcher in watchers.items():
            node.supervisor.start(f"status-watch-{district}", watcher.run)
        if intake is not None and intake.listen_port is not None:
            node.supervisor.start("intake-port", node._keep_intake_port)
        return node

    async def _keep_intake_port(self) -> None:
        """A worker that died is replaced, and its replacement serves the intake port."""
        assert self.intake is not None
        await self.intake.keep_listening(INTAKE_CHECK_S)

    @property
    def intake_address(self) -> str | None:
        """``host:port`` of the intake port, if the intake's worker serves one."""
        if self.intake is None or self.intake.listen_port is None:
            return None
        listen = self.intake_listen or ""
        return f"{listen.rsplit(':', 1)[0]}:{self.intake.listen_port}"

    async def _set_component(self, name: str, ok: bool) -> None:
        status = health_pb2.HealthCheckResponse
        await self.health.set(name, status.SERVING if ok else status.NOT_SERVING)

    async def _watch_components(self) -> None:
        while True:
            await asyncio.sleep(COMPONENT_CHECK_S)
            await self._check_components()

    async def _check_components(self) -> None:
        """``yikatong.ledger`` and ``yikatong.redis``: can this node reach what it writes to."""
        checks: dict[str, bool] = {}
        if self.intake is not None:
            checks["yikatong.ledger"] = await self.intake.reachable()
        if self.cache.remote is not None:
            checks["yikatong.redis"] = await self.cache.remote.reachable()
        for name, ok in checks.items():
            if self._components.get(name) != ok:
                self._components[name] = ok
                await self._set_component(name, ok)
                if not ok:
                    log.warning("component_unreachable", component=name)

    def request_reload(self) -> None:
        """Re-read certificates, keys, CA bundles and revocation lists now (e.g. on SIGHUP)."""
        self._reload_now.set()

    async def _watch_trust(self) -> None:
        interval = self.config.tls.reload_interval_ms / 1000
        serving = True
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for may swallow a cancellation that
            # comes as the event is set, and the node's stop would wait for this loop forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._reload_now.wait()
            forced = self._reload_now.is_set()
            self._reload_now.clear()
            # Parsing certificates holds the GIL for milliseconds: only when a file changed
            # (or a peer's bundle grew too old to trust, which the reload then drops).
            stale = forced or self.trust.changed() or self.trust.too_old()
            if stale and await asyncio.to_thread(self.trust.reload):
                self.channels.sync()  # a new pinned name ends calls on the old one now
                if self.guard is not None:  # and a revoked caller's stream ends now
                    self.guard.end_refused_streams()
            await self._report_trust()
            # Health fails while this node's own certificate is expired: monitoring sees it.
            valid = self.trust.current.not_after > self._clock()
            if valid != serving:
                serving = valid
                status = (
                    health_pb2.HealthCheckResponse.SERVING
                    if valid
                    else health_pb2.HealthCheckResponse.NOT_SERVING
                )
                for name in ("", *SERVICE_NAMES[:5]):
                    await self.health.set(name, status)
                log.warning(
                    "node_certificate_state",
                    valid=valid,
                    not_after=self.trust.current.not_after.isoformat(),
                )

    async def _report_trust(self) -> None:
        """Per-component trust health (``yikatong.trust.crl``, ``yikatong.trust.peer.<code>``).

        These never change the overall ``""`` status: a lapsed revocation list
        or a stale peer bundle is for monitoring to see, not a reason to stop
        answering gates.
        """
        now = self.trust.health()
        if self.refresher is not None:
            for peer in self.config.peers:
                name = peer_health_name(peer.district)
                now[name] = now[name] and self.refresher.fetching(peer.district)
        for name, ok in now.items():
            if self._components.get(name) == ok:
                continue
            self._components[name] = ok
            status = health_pb2.HealthCheckResponse
            await self.health.set(name, status.SERVING if ok else status.NOT_SERVING)
            if not ok:
                log.warning("trust_component_unhealthy", component=name)

    @property
    def address(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def stop(self, grace: float = 1.0) -> None:
        try:
            await self._close(grace)
        finally:  # whatever failed to close, the process gets its CPUs back
            if self.cpus_before is not None:
                keep_to(self.cpus_before)
        log.info("node_stopped", district=self.config.district)

    async def _close(self, grace: float) -> None:
        await self.supervisor.stop()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.channels.close()
        await self.cache.close()
        if self.feed is not None:
            await self.feed.close()
        if self.book is not None:
            self.book.close()
        if self.admin is not None:
            self.admin.close()
        if self.home is not None:
            self.home.close()
        self.registry.close()
        if self.intake is not None:
            self.intake.close()
        if self.clearing is not None:
            self.clearing.close()
