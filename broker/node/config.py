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
    crl_file = "certs/500111/crl.pem"      # optional: revocations by this district's CA(s)
    min_version = "1.3"                    # enforced per call
    max_connection_age_s = 300             # connections are recycled this often
    reload_interval_ms = 1000              # files above re-read when they change

    [registry]
    path = "var/500111/registry.sqlite3"

    [privacy]
    hash_key_file = "certs/500111/hash.key"

    [recognition]                          # what this node tells its peers
    cache_ttl_seconds = 120
    unknown_ttl_seconds = 10

    [cache]                                # how this node caches its peers' answers
    redis_url = ""                         # empty: in-process tier only
    local_max_entries = 100000

    [peering]
    deadline_ms = 300

    [fares]
    file = "fares.toml"                    # this district's fare rules (broker/fares/rules.py)

    [ledger]
    path = "var/500111/ledger.sqlite3"     # operators' trips (Settlement.SubmitTrips), or
    # url = "postgresql://yikatong@db.example/ledger"   PostgreSQL instead of SQLite
    # schema = "yikatong"                    the PostgreSQL schema (one per district)

    [settlement]
    key_file = "certs/500111/settlement.key"  # Ed25519; signs batches, acks, fare rules

    [[agreements]]                         # what a home district owes (broker/fares/agreements.py)
    district = "512021"
    collect_through_home = true
    concession_share_bp = { senior-bus-free = 10000, scenic-senior = 5000 }

    [access]                               # deny by default; these add to or replace
    "yikatong.v1.Gate/Check" = ["own-operators"]   # defaults: broker/trust/access.py

    [trust]
    bundle_file = "certs/500111/bundle.json"   # this district's signed bundle, served to peers
    bundle_refresh_s = 30                      # how often peers' bundles are fetched

    [[peers]]
    district = "512021"
    address = "10.1.2.3:50111"
    bundle_file = "var/peers/512021.bundle.json"  # its trust bundle: first `broker trust
                                                  # import`, then fetched and kept current
    # or, without bundles: ca_file = "..." and crl_file = "..." kept current by hand
    # server_name = "node.512021.yikatong.cy"   (the default)

Relative paths are relative to the config file's directory. Environment
overrides (each optional): ``YIKATONG_LISTEN``, ``YIKATONG_REDIS_URL``,
``YIKATONG_REGISTRY_PATH``, ``YIKATONG_PEER_DEADLINE_MS``, ``YIKATONG_LEDGER_URL``.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from broker.cards.model import validate_region
from broker.core.errors import ConfigError, InvalidArgument
from broker.fares.agreements import Agreement, parse_agreements
from broker.gate.config import CacheConfig, RecognitionConfig
from broker.trust.access import DEFAULT_RULES, validate_rules
from broker.trust.config import TLS_VERSIONS, PeerConfig, TLSConfig, TrustConfig, node_server_name


@dataclass(frozen=True)
class NodeConfig:
    """Everything one district node needs; built by :func:`load_config`."""

    district: str
    listen: str
    tls: TLSConfig
    registry_path: Path
    hash_key_file: Path
    peers: tuple[PeerConfig, ...] = ()
    peer_deadline_ms: int = 300
    recognition: RecognitionConfig = field(default_factory=RecognitionConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    access: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_RULES))
    trust: TrustConfig = field(default_factory=TrustConfig)
    fares_file: Path | None = None
    ledger_path: Path | None = None
    ledger_url: str | None = None
    ledger_schema: str = "yikatong"
    settlement_key_file: Path | None = None
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


def _int(table: Mapping[str, Any], key: str, default: int, where: str) -> int:
    value = table.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{where}{key} must be a non-negative integer")
    return value


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

    district = _code(_req(doc, "district", ""), "district")
    tls_t = _section(doc, "tls")
    min_version = str(tls_t.get("min_version", "1.3"))
    if min_version not in TLS_VERSIONS:
        raise ConfigError(f"tls.min_version must be one of {', '.join(TLS_VERSIONS)}")
    tls = TLSConfig(
        ca_file=path(_req(tls_t, "ca_file", "tls.")),
        cert_file=path(_req(tls_t, "cert_file", "tls.")),
        key_file=path(_req(tls_t, "key_file", "tls.")),
        crl_file=path(tls_t["crl_file"]) if tls_t.get("crl_file") else None,
        min_version=min_version,
        max_connection_age_s=_int(tls_t, "max_connection_age_s", 300, "tls."),
        reload_interval_ms=_int(tls_t, "reload_interval_ms", 1000, "tls."),
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
        peers.append(
            PeerConfig(
                district=code,
                address=str(_req(p, "address", where)),
                ca_file=path(p["ca_file"]) if p.get("ca_file") else None,
                server_name=str(p.get("server_name", node_server_name(code))),
                crl_file=path(p["crl_file"]) if p.get("crl_file") else None,
                bundle_file=path(p["bundle_file"]) if p.get("bundle_file") else None,
            )
        )
    trust_t = _section(doc, "trust")
    fares_t = _section(doc, "fares")
    ledger_t = _section(doc, "ledger")
    settle_t = _section(doc, "settlement")
    try:
        access = {**DEFAULT_RULES, **validate_rules(_section(doc, "access"))}
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    redis_url = str(cache_t.get("redis_url", "")) or None
    cfg = NodeConfig(
        district=district,
        listen=str(_req(doc, "listen", "")),
        tls=tls,
        registry_path=path(_req(_section(doc, "registry"), "path", "registry.")),
        hash_key_file=path(_req(_section(doc, "privacy"), "hash_key_file", "privacy.")),
        peers=tuple(peers),
        peer_deadline_ms=_int(peering_t, "deadline_ms", 300, "peering."),
        recognition=RecognitionConfig(
            cache_ttl_seconds=_int(rec_t, "cache_ttl_seconds", 120, "recognition."),
            unknown_ttl_seconds=_int(rec_t, "unknown_ttl_seconds", 10, "recognition."),
        ),
        cache=CacheConfig(
            redis_url=redis_url,
            local_max_entries=_int(cache_t, "local_max_entries", 100_000, "cache."),
            unknown_ttl_seconds=_int(cache_t, "unknown_ttl_seconds", 10, "cache."),
            max_ttl_seconds=_int(cache_t, "max_ttl_seconds", 3600, "cache."),
            redis_timeout_ms=_int(cache_t, "redis_timeout_ms", 50, "cache."),
        ),
        access=access,
        trust=TrustConfig(
            bundle_file=path(trust_t["bundle_file"]) if trust_t.get("bundle_file") else None,
            bundle_refresh_s=_int(trust_t, "bundle_refresh_s", 30, "trust."),
        ),
        fares_file=path(fares_t["file"]) if fares_t.get("file") else None,
        ledger_path=path(ledger_t["path"]) if ledger_t.get("path") else None,
        ledger_url=str(ledger_t["url"]) if ledger_t.get("url") else None,
        ledger_schema=str(ledger_t.get("schema", "yikatong")),
        settlement_key_file=path(settle_t["key_file"]) if settle_t.get("key_file") else None,
        agreements=parse_agreements(doc.get("agreements", [])),
    )
    return apply_env(cfg, env)


def apply_env(cfg: NodeConfig, env: Mapping[str, str]) -> NodeConfig:
    """Apply the documented ``YIKATONG_*`` overrides."""
    if "YIKATONG_LISTEN" in env:
        cfg = replace(cfg, listen=env["YIKATONG_LISTEN"])
    if "YIKATONG_REDIS_URL" in env:
        cfg = replace(cfg, cache=replace(cfg.cache, redis_url=env["YIKATONG_REDIS_URL"] or None))
    if "YIKATONG_REGISTRY_PATH" in env:
        cfg = replace(cfg, registry_path=Path(env["YIKATONG_REGISTRY_PATH"]))
    if "YIKATONG_LEDGER_URL" in env:
        cfg = replace(cfg, ledger_url=env["YIKATONG_LEDGER_URL"] or None)
    if "YIKATONG_PEER_DEADLINE_MS" in env:
        try:
            cfg = replace(cfg, peer_deadline_ms=int(env["YIKATONG_PEER_DEADLINE_MS"]))
        except ValueError as exc:
            raise ConfigError("YIKATONG_PEER_DEADLINE_MS must be an integer") from exc
    return cfg


def load_config(path: Path, env: Mapping[str, str]) -> NodeConfig:
    """Read and validate a node.toml; see the module docstring for its shape."""
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc
    return parse_config(doc, path.resolve().parent, env)


def _q(value: object) -> str:
    """A TOML basic string (JSON's escapes are valid TOML escapes)."""
    return json.dumps(str(value), ensure_ascii=False)


def render_config(cfg: NodeConfig) -> str:
    """The TOML text that :func:`load_config` reads back as ``cfg`` (paths made absolute)."""
    lines = [
        f"district = {_q(cfg.district)}",
        f"listen = {_q(cfg.listen)}",
        "",
        "[tls]",
        f"ca_file = {_q(cfg.tls.ca_file)}",
        f"cert_file = {_q(cfg.tls.cert_file)}",
        f"key_file = {_q(cfg.tls.key_file)}",
        *([f"crl_file = {_q(cfg.tls.crl_file)}"] if cfg.tls.crl_file else []),
        f"min_version = {_q(cfg.tls.min_version)}",
        f"max_connection_age_s = {cfg.tls.max_connection_age_s}",
        f"reload_interval_ms = {cfg.tls.reload_interval_ms}",
        "",
        "[registry]",
        f"path = {_q(cfg.registry_path)}",
        "",
        "[privacy]",
        f"hash_key_file = {_q(cfg.hash_key_file)}",
        "",
        "[recognition]",
        f"cache_ttl_seconds = {cfg.recognition.cache_ttl_seconds}",
        f"unknown_ttl_seconds = {cfg.recognition.unknown_ttl_seconds}",
        "",
        "[cache]",
        f"redis_url = {_q(cfg.cache.redis_url or '')}",
        f"local_max_entries = {cfg.cache.local_max_entries}",
        f"unknown_ttl_seconds = {cfg.cache.unknown_ttl_seconds}",
        f"max_ttl_seconds = {cfg.cache.max_ttl_seconds}",
        f"redis_timeout_ms = {cfg.cache.redis_timeout_ms}",
        "",
        "[peering]",
        f"deadline_ms = {cfg.peer_deadline_ms}",
    ]
    if cfg.fares_file:
        lines += ["", "[fares]", f"file = {_q(cfg.fares_file)}"]
    if cfg.ledger_path or cfg.ledger_url:
        lines += ["", "[ledger]"]
        lines += [f"path = {_q(cfg.ledger_path)}"] if cfg.ledger_path else []
        lines += [f"url = {_q(cfg.ledger_url)}"] if cfg.ledger_url else []
        lines += [f"schema = {_q(cfg.ledger_schema)}"] if cfg.ledger_url else []
    if cfg.settlement_key_file:
        lines += ["", "[settlement]", f"key_file = {_q(cfg.settlement_key_file)}"]
    lines += ["", "[trust]", f"bundle_refresh_s = {cfg.trust.bundle_refresh_s}"]
    if cfg.trust.bundle_file:
        lines.append(f"bundle_file = {_q(cfg.trust.bundle_file)}")
    lines += ["", "[access]"]
    lines += [f"{_q(key)} = {json.dumps(list(who))}" for key, who in cfg.access.items()]
    for a in cfg.agreements:
        shares = ", ".join(f"{_q(k)} = {v}" for k, v in a.concession_share_bp.items())
        lines += [
            "",
            "[[agreements]]",
            f"district = {_q(a.district)}",
            f"collect_through_home = {'true' if a.collect_through_home else 'false'}",
            f"concession_share_bp = {{ {shares} }}",
        ]
    for p in cfg.peers:
        lines += [
            "",
            "[[peers]]",
            f"district = {_q(p.district)}",
            f"address = {_q(p.address)}",
            *([f"ca_file = {_q(p.ca_file)}"] if p.ca_file else []),
            f"server_name = {_q(p.server_name)}",
            *([f"crl_file = {_q(p.crl_file)}"] if p.crl_file else []),
            *([f"bundle_file = {_q(p.bundle_file)}"] if p.bundle_file else []),
        ]
    return "\n".join(lines) + "\n"
