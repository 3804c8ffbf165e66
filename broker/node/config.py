"""Node configuration: frozen dataclasses per concern, loaded from TOML plus env overrides.

Nothing else in the broker reads the environment or a config file: the CLI
calls :func:`load_config` once and passes the result down.

A node.toml looks like::

    district = "500111"
    listen = "127.0.0.1:50111"

    [tls]
    ca_file = "certs/500111/ca.pem"        # this district's CA(s)
    cert_file = "certs/500111/node.pem"    # this node's certificate (chain)
    key_file = "certs/500111/node.key"
    crl_file = "certs/500111/crl.pem"      # revocations by this district's CA(s); required
    min_version = "1.3"                    # enforced per call
    max_connection_age_s = 300             # connections are recycled this often
    reload_interval_ms = 1000              # files above re-read when they change

    [registry]
    path = "var/500111/registry.sqlite3"
    event_retention_hours = 72             # card changes kept for peers that were away
    # url = "postgresql://yikatong@db.example/registry"   PostgreSQL instead of SQLite
    # schema = "registry"                    (replicas on several hosts share it)

    [privacy]
    hash_key_file = "certs/500111/hash.key"

    [recognition]                          # what this node tells its peers
    cache_ttl_seconds = 120
    unknown_ttl_seconds = 10
    max_stale_seconds = 600                # past the TTL, a peer that cannot reach us may
                                           # still use an answer this long (STALE)

    [cache]                                # how this node caches its peers' answers
    redis_url = ""                         # empty: in-process tier only
    local_max_entries = 100000             # bound of the in-process tier (0 disables it)
    unknown_ttl_seconds = 10               # an UNKNOWN answer is cached at most this long
    max_ttl_seconds = 3600                 # any answer at most this long
    redis_timeout_ms = 50                  # a slower Redis call counts as a miss
    max_stale_seconds = { bus = 600, scenic_area = 1800, museum = 1800, library = 3600 }
                                           # per scene: how long past its TTL an answer
                                           # may be used, STALE, when its home is away

    [offline]                              # a card that cannot be verified (its home
    bus = "deny"                           # away, nothing usable cached), per scene:
    scenic_area = "deny"                   # "deny" (the default), or "allow_standard_fare"
    museum = "deny"                        # (through at the full fare, no concession,
    library = "deny"                       # marked unverified)

    [peering]
    deadline_ms = 300                      # then the offline policy decides

    [fares]
    file = "fares.toml"                    # this district's fare rules (broker/fares/rules.py)
    changeover_grace_s = 600               # after a new table takes effect, the previous one
                                           # is still accepted this long (gates' clocks)

    [ledger]
    path = "var/500111/ledger.sqlite3"     # operators' trips (Settlement.SubmitTrips), or
    # url = "postgresql://yikatong@db.example/ledger"   PostgreSQL instead of SQLite
    # schema = "yikatong"                    the PostgreSQL schema (one per district)

    [settlement]
    key_file = "certs/500111/settlement.key"  # Ed25519; signs batches, acks, fare rules
    duplicate_window_s = 5                 # the same tap (operator, card, gate, place) under
                                           # another trip id this close: suspected_duplicate
    max_batch_lines = 20000000             # a neighbour's batch holding more is refused as it
    max_batch_bytes = 4000000000           # arrives (RESOURCE_EXHAUSTED), before it is spooled
    intake_listen = "0.0.0.0:50112"        # operators upload here: served by the intake's worker
    # worker_cpus = [1]                    the workers (intake, verification) and the close
                                           # keep to CPU 1, the gates to the other CPUs

    [[agreements]]                         # what a home district owes (broker/fares/agreements.py)
    district = "512021"
    collect_through_home = true
    concession_share_bp = { senior-bus-free = 10000, scenic-senior = 5000 }
    offline_risk = "operator"              # offline-policy trips: "operator" or "home" pays

    [access]                               # deny by default; these add to or replace
    "yikatong.v1.Gate/Check" = ["own-operators"]   # defaults: broker/trust/access.py

    [trust]
    bundle_file = "certs/500111/bundle.json"   # this district's signed bundle, served to peers
    bundle_refresh_s = 30                      # how often peers' bundles are fetched
    max_bundle_age_s = 172800                  # a peer bundle older: its health fails
    bundle_hard_age_s = 604800                 # older still: that peer is not trusted
    crl_state_file = "var/500111/crl-state"    # highest revocation-list numbers accepted

    [[peers]]
    district = "512021"
    address = "10.1.2.3:50111"
    bundle_file = "var/peers/512021.bundle.json"  # its trust bundle: first `broker trust
                                                  # import`, then fetched and kept current
    # ca_file = "certs/peers/512021-ca.pem"    or, without a bundle, the peer's CA(s)
    # crl_file = "certs/peers/512021-crl.pem"  and its revocation list(s) (required then),
                                               # kept current by hand
    # server_name = "node.512021.yikatong.cy"   (the default)

Every key a node reads is in the example above (a test holds the example and
the dataclasses to each other). Each section is a frozen dataclass owned by its
concern's package: ``[tls]``, ``[[peers]]`` and ``[trust]`` by ``trust.config``,
``[registry]`` and ``[privacy]`` by ``cards.config``, ``[recognition]`` and
``[cache]`` by ``gate.config``, ``[peering]`` by ``peers.config``, ``[fares]``
by ``fares.config``, ``[ledger]`` and ``[settlement]`` by
``settlement.config``, ``[[agreements]]`` by ``fares.agreements`` and
``[access]`` by ``trust.access``. Relative paths are relative to the config
file's directory. Environment overrides (each optional) are declared on the
field they override (``metadata={"env": ...}``): ``YIKATONG_LISTEN``,
``YIKATONG_REDIS_URL``, ``YIKATONG_REGISTRY_PATH``, ``YIKATONG_REGISTRY_URL``,
``YIKATONG_PEER_DEADLINE_MS``, ``YIKATONG_LEDGER_URL``, ``YIKATONG_INTAKE_LISTEN``; an empty value
clears an optional one.

Every integer key has a range (:data:`BOUNDS`): intervals and timeouts are at
least 1, since a zero reload interval would spin the event loop and a zero
deadline refuse every peer; only TTLs (0: do not cache) and
``cache.local_max_entries`` (0: no in-process tier) may be 0. A value outside
its range is refused naming the key, or the variable for an override.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import tomli_w

from broker.cards.config import PrivacyConfig, RegistryConfig
from broker.cards.model import validate_region
from broker.core.errors import ConfigError, InvalidArgument
from broker.fares.agreements import Agreement, parse_agreements
from broker.fares.config import FaresConfig
from broker.gate.config import (
    CacheConfig,
    OfflineConfig,
    RecognitionConfig,
    offline_by_scene,
    stale_by_scene,
)
from broker.peers.config import PeeringConfig
from broker.settlement.config import LedgerConfig, SettlementKeyConfig
from broker.trust.access import DEFAULT_RULES, validate_rules
from broker.trust.config import TLS_VERSIONS, PeerConfig, TLSConfig, TrustConfig, node_server_name

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    C = TypeVar("C", bound=DataclassInstance)
else:
    C = TypeVar("C")


@dataclass(frozen=True)
class NodeConfig:
    """Everything one district node needs; built by :func:`load_config`.

    Attributes:
        district: this district's 6-digit code.
        listen: host:port the node serves on (``YIKATONG_LISTEN`` overrides it).
        tls, registry, privacy, peers, peering, recognition, cache, offline, access,
        trust, fares, ledger, settlement, agreements: one per section of node.toml.
    """

    district: str
    listen: str = field(metadata={"env": "YIKATONG_LISTEN"})
    tls: TLSConfig
    registry: RegistryConfig
    privacy: PrivacyConfig
    peers: tuple[PeerConfig, ...] = ()
    peering: PeeringConfig = field(default_factory=PeeringConfig)
    recognition: RecognitionConfig = field(default_factory=RecognitionConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    access: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_RULES))
    trust: TrustConfig = field(default_factory=TrustConfig)
    fares: FaresConfig = field(default_factory=FaresConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    settlement: SettlementKeyConfig = field(default_factory=SettlementKeyConfig)
    agreements: tuple[Agreement, ...] = ()

    def agreement(self, district: str) -> Agreement | None:
        """This district's agreement with home district ``district``, if any."""
        return next((a for a in self.agreements if a.district == district), None)

    def peer(self, district: str) -> PeerConfig | None:
        """The configured peer for ``district``, if any."""
        for p in self.peers:
            if p.district == district:
                return p
        return None


def _section(doc: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"[{name}] must be a table")
    return value


def _req(table: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in table:
        raise ConfigError(f"{where}{key} is required")
    return table[key]


@dataclass(frozen=True)
class Range:
    """The values an integer setting may take, both ends included."""

    low: int
    high: int

    def check(self, value: object, name: str) -> int:
        """``value`` if it is an integer in range; else a :class:`ConfigError` naming ``name``."""
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer from {self.low} to {self.high}")
        if not self.low <= value <= self.high:
            raise ConfigError(f"{name} must be from {self.low} to {self.high}, not {value}")
        return value


_DAY_S = 86_400

# The range of every integer field a node.toml sets, by section dataclass and field:
# the sections belong to their concerns, what a file may say is the loader's to check.
BOUNDS: Mapping[tuple[type[Any], str], Range] = {
    (RegistryConfig, "event_retention_hours"): Range(1, 24 * 90),  # peers away longer flush
    (TLSConfig, "max_connection_age_s"): Range(1, _DAY_S),  # how long a revoked caller stays
    (TLSConfig, "reload_interval_ms"): Range(1, 3_600_000),  # 0 busy-loops the event loop
    (TrustConfig, "bundle_refresh_s"): Range(1, _DAY_S),  # how late peers' revocations arrive
    (TrustConfig, "max_bundle_age_s"): Range(1, 30 * _DAY_S),
    (TrustConfig, "bundle_hard_age_s"): Range(1, 30 * _DAY_S),
    (PeeringConfig, "deadline_ms"): Range(1, 60_000),  # a gate waits 400 ms in all
    (FaresConfig, "changeover_grace_s"): Range(0, 3600),  # 0: no grace at a fare change
    (SettlementKeyConfig, "duplicate_window_s"): Range(0, 600),  # 0: no duplicate-tap check
    (SettlementKeyConfig, "max_batch_lines"): Range(1, 1_000_000_000),
    (SettlementKeyConfig, "max_batch_bytes"): Range(1, 1_000_000_000_000),  # 1 TB
    (RecognitionConfig, "cache_ttl_seconds"): Range(0, _DAY_S),  # 0: peers do not cache
    (RecognitionConfig, "max_stale_seconds"): Range(0, _DAY_S),  # 0: no stale answers
    (RecognitionConfig, "unknown_ttl_seconds"): Range(0, _DAY_S),
    (CacheConfig, "local_max_entries"): Range(0, 10_000_000),  # 0: no in-process tier
    (CacheConfig, "unknown_ttl_seconds"): Range(0, _DAY_S),  # 0: UNKNOWN is not cached
    (CacheConfig, "max_ttl_seconds"): Range(0, _DAY_S),  # 0: nothing is cached
    (CacheConfig, "redis_timeout_ms"): Range(1, 60_000),
}


def _int(
    table: Mapping[str, Any], section: type[Any], key: str, default: int | None, where: str
) -> int:
    """``table[key]``, in its range; ``default`` (None: the section's own) when it is absent."""
    fallback = getattr(section, key) if default is None else default
    return BOUNDS[(section, key)].check(table.get(key, fallback), f"{where}{key}")


def _registry(table: Mapping[str, Any], path: Path | None) -> RegistryConfig:
    url = str(table["url"]) if table.get("url") else None
    if path is None and url is None:
        raise ConfigError("registry.path (SQLite) or registry.url (PostgreSQL) is required")
    schema = str(table.get("schema", RegistryConfig.schema))  # checked where it is opened
    hours = _int(table, RegistryConfig, "event_retention_hours", 72, "registry.")
    return RegistryConfig(path, hours, url, schema)


def _settlement(table: Mapping[str, Any], key_file: Path | None) -> SettlementKeyConfig:
    def number(key: str) -> int:
        return _int(table, SettlementKeyConfig, key, None, "settlement.")

    listen = table.get("intake_listen")
    return SettlementKeyConfig(
        key_file=key_file,
        duplicate_window_s=number("duplicate_window_s"),
        max_batch_lines=number("max_batch_lines"),
        max_batch_bytes=number("max_batch_bytes"),
        intake_listen=str(listen) if listen else None,
        worker_cpus=_cpus(table.get("worker_cpus", []), "settlement.worker_cpus"),
    )


def _cpus(value: Any, name: str) -> tuple[int, ...]:
    """A list of distinct CPU numbers (checked against the machine where it is used)."""
    if not isinstance(value, list):
        raise ConfigError(f"{name} must be a list of CPU numbers, as taskset takes them")
    cpus = tuple(Range(0, 4095).check(v, f"{name}[{i}]") for i, v in enumerate(value))
    if len(set(cpus)) != len(cpus):
        raise ConfigError(f"{name} names a CPU twice")
    return cpus


def _code(value: Any, where: str) -> str:
    try:
        return validate_region(str(value), where)
    except InvalidArgument as exc:
        raise ConfigError(str(exc)) from exc


def parse_config(doc: Mapping[str, Any], base: Path, env: Mapping[str, str]) -> NodeConfig:
    """Build a :class:`NodeConfig` from a parsed TOML document.

    Args:
        doc: the TOML document.
        base: directory relative paths are resolved against.
        env: environment whose ``YIKATONG_*`` variables override the document.
    """

    def path(value: Any) -> Path:
        p = Path(str(value))
        return p if p.is_absolute() else (base / p)

    def opt_path(table: Mapping[str, Any], key: str) -> Path | None:
        return path(table[key]) if table.get(key) else None

    district = _code(_req(doc, "district", ""), "district")
    tls_t = _section(doc, "tls")
    min_version = str(tls_t.get("min_version", "1.3"))
    if min_version not in TLS_VERSIONS:
        raise ConfigError(f"tls.min_version must be one of {', '.join(TLS_VERSIONS)}")
    tls = TLSConfig(
        ca_file=path(_req(tls_t, "ca_file", "tls.")),
        cert_file=path(_req(tls_t, "cert_file", "tls.")),
        key_file=path(_req(tls_t, "key_file", "tls.")),
        crl_file=path(_req(tls_t, "crl_file", "tls.")),
        min_version=min_version,
        max_connection_age_s=_int(tls_t, TLSConfig, "max_connection_age_s", 300, "tls."),
        reload_interval_ms=_int(tls_t, TLSConfig, "reload_interval_ms", 1000, "tls."),
    )
    rec_t = _section(doc, "recognition")
    cache_t = _section(doc, "cache")
    peering_t = _section(doc, "peering")
    peers: list[PeerConfig] = []
    raw_peers = doc.get("peers", [])
    if not isinstance(raw_peers, list):
        raise ConfigError("[[peers]] must be an array of tables")
    for i, p in enumerate(raw_peers):
        where = f"peers[{i}]."
        code = _code(_req(p, "district", where), f"{where}district")
        if code == district:
            raise ConfigError(f"{where}district is this node's own district")
        if any(q.district == code for q in peers):
            raise ConfigError(f"{where}district {code} is configured twice")
        if not p.get("ca_file") and not p.get("bundle_file"):
            raise ConfigError(f"{where}ca_file or {where}bundle_file is required")
        if p.get("ca_file") and not p.get("bundle_file") and not p.get("crl_file"):
            raise ConfigError(f"{where}crl_file is required with {where}ca_file")
        peers.append(
            PeerConfig(
                district=code,
                address=str(_req(p, "address", where)),
                ca_file=opt_path(p, "ca_file"),
                server_name=str(p.get("server_name", node_server_name(code))),
                crl_file=opt_path(p, "crl_file"),
                bundle_file=opt_path(p, "bundle_file"),
            )
        )
    trust_t = _section(doc, "trust")
    fares_t = _section(doc, "fares")
    ledger_t = _section(doc, "ledger")
    settlement_t = _section(doc, "settlement")
    try:
        access = {**DEFAULT_RULES, **validate_rules(_section(doc, "access"))}
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    cfg = NodeConfig(
        district=district,
        listen=str(_req(doc, "listen", "")),
        tls=tls,
        registry=_registry(_section(doc, "registry"), opt_path(_section(doc, "registry"), "path")),
        privacy=PrivacyConfig(
            hash_key_file=path(_req(_section(doc, "privacy"), "hash_key_file", "privacy."))
        ),
        peers=tuple(peers),
        peering=PeeringConfig(
            deadline_ms=_int(peering_t, PeeringConfig, "deadline_ms", 300, "peering.")
        ),
        recognition=RecognitionConfig(
            cache_ttl_seconds=_int(
                rec_t, RecognitionConfig, "cache_ttl_seconds", 120, "recognition."
            ),
            unknown_ttl_seconds=_int(
                rec_t, RecognitionConfig, "unknown_ttl_seconds", 10, "recognition."
            ),
            max_stale_seconds=_int(
                rec_t, RecognitionConfig, "max_stale_seconds", 600, "recognition."
            ),
        ),
        cache=CacheConfig(
            redis_url=str(cache_t.get("redis_url", "")) or None,
            local_max_entries=_int(cache_t, CacheConfig, "local_max_entries", 100_000, "cache."),
            unknown_ttl_seconds=_int(cache_t, CacheConfig, "unknown_ttl_seconds", 10, "cache."),
            max_ttl_seconds=_int(cache_t, CacheConfig, "max_ttl_seconds", 3600, "cache."),
            redis_timeout_ms=_int(cache_t, CacheConfig, "redis_timeout_ms", 50, "cache."),
            max_stale_seconds=stale_by_scene(cache_t),
        ),
        offline=OfflineConfig(offline_by_scene(_section(doc, "offline"))),
        access=access,
        trust=TrustConfig(
            bundle_file=opt_path(trust_t, "bundle_file"),
            bundle_refresh_s=_int(trust_t, TrustConfig, "bundle_refresh_s", 30, "trust."),
            max_bundle_age_s=_int(trust_t, TrustConfig, "max_bundle_age_s", None, "trust."),
            bundle_hard_age_s=_int(trust_t, TrustConfig, "bundle_hard_age_s", None, "trust."),
            crl_state_file=path(trust_t.get("crl_state_file", f"var/{district}/crl-state")),
        ),
        fares=FaresConfig(
            file=opt_path(fares_t, "file"),
            changeover_grace_s=_int(fares_t, FaresConfig, "changeover_grace_s", 600, "fares."),
        ),
        ledger=LedgerConfig(
            path=opt_path(ledger_t, "path"),
            url=str(ledger_t["url"]) if ledger_t.get("url") else None,
            schema=str(ledger_t.get("schema", "yikatong")),
        ),
        settlement=_settlement(settlement_t, opt_path(settlement_t, "key_file")),
        agreements=parse_agreements(doc.get("agreements", [])),
    )
    return apply_env(cfg, env)


def _from_env(name: str, raw: str, hint: str, bound: Range | None) -> Any:
    """The value of override ``name`` for a field whose type is ``hint`` and range ``bound``."""
    optional = "None" in hint
    if optional and raw == "":
        return None
    if hint.startswith("Path"):
        return Path(raw)
    if hint == "int":
        try:
            value = int(raw)
        except ValueError as exc:
            raise ConfigError(f"{name} must be an integer") from exc
        return bound.check(value, name) if bound is not None else value
    return raw


def apply_env(cfg: C, env: Mapping[str, str]) -> C:
    """Apply every ``YIKATONG_*`` override declared on a field of ``cfg`` or its sections."""
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        name = f.metadata.get("env")
        if name is not None and name in env:
            bound = BOUNDS.get((type(cfg), f.name))
            changes[f.name] = _from_env(name, env[name], str(f.type), bound)  # postponed: a string
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            updated = apply_env(value, env)
            if updated is not value:
                changes[f.name] = updated
    return replace(cfg, **changes) if changes else cfg


def load_config(path: Path, env: Mapping[str, str]) -> NodeConfig:
    """Read and validate a node.toml; see the module docstring for its shape."""
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc
    return parse_config(doc, path.resolve().parent, env)


def _plain(value: Any) -> Any:
    """A section as TOML data: paths as text, ``None`` left out (TOML has no null)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if v is not None:
                out[f.name] = _plain(v)
        return out
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def render_config(cfg: NodeConfig) -> str:
    """The TOML text that :func:`load_config` reads back as ``cfg`` (paths made absolute)."""
    doc = _plain(cfg)
    # Only what differs from the defaults: a rule for a service a previous release does not
    # have (or a principal it does not know) would stop that release reading the file.
    doc["access"] = {k: list(v) for k, v in cfg.access.items() if DEFAULT_RULES.get(k) != v}
    if cfg.registry.event_retention_hours == RegistryConfig.event_retention_hours:
        doc["registry"].pop("event_retention_hours", None)
    if cfg.ledger.url is None:
        doc["ledger"].pop("schema", None)  # only PostgreSQL has schemas
    if cfg.registry.url is None:
        doc["registry"].pop("schema", None)
    doc["offline"] = dict(cfg.offline.policy)  # scene = policy, in the section itself
    if cfg.fares.file is None:
        doc.pop("fares", None)  # no rules, nothing priced: the grace means nothing
    if cfg.settlement == SettlementKeyConfig():
        doc.pop("settlement", None)  # every default, as a file without the section reads
    return tomli_w.dumps({k: v for k, v in doc.items() if v != {}})  # unset sections left out
