"""Local multi-district setups on loopback: CAs, certificates, configs and synthetic registries.

Used by ``broker demo``, the benchmark and the end-to-end tests, so all three
exercise the same code paths a real deployment uses: certificates issued by
:mod:`broker.trust.pki`, configs read back by :func:`broker.node.config.load_config`,
registries filled by the CSV import. Synthetic card-holders have no names;
their ID numbers are well-formed but random.
"""

from __future__ import annotations

import csv
import os
import random
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc

from broker.cards.config import PrivacyConfig, RegistryConfig
from broker.cards.csv_import import COLUMNS, parse_import
from broker.cards.gb11643 import ssn_check_character
from broker.cards.model import CardRef, shanghai_day
from broker.cards.privacy import create_key_file, load_key_file
from broker.cards.registry import Registry
from broker.core.files import make_private_dirs
from broker.fares.agreements import Agreement
from broker.fares.config import FaresConfig
from broker.gate.config import CacheConfig, RecognitionConfig
from broker.node.config import NodeConfig, load_config, render_config
from broker.peers.bundles import accept
from broker.peers.config import PeeringConfig
from broker.settlement.config import LedgerConfig, SettlementKeyConfig
from broker.testbed.operator_client import open_channel
from broker.trust import certops
from broker.trust.bundle import SignedBundle
from broker.trust.certops import DistrictPaths
from broker.trust.config import PeerConfig, TLSConfig, TrustConfig, node_server_name
from broker.trust.identity import node_identity, operator_identity

OPERATOR_ID = "transit-01"


# Every testbed district prices by the same sample rules (each district may set its own).
SAMPLE_FARES = """
[[table]]
version = "sample-1"
effective_from = "2020-01-01"

[[table.scheme]]
name = "senior-bus-free"
per_month = 60
per_year = 1200

[[table.rule]]
scene = "bus"
gross_fare_fen = 200
concessions = [
  { entitlement = "senior_65", kind = "free", scheme = "senior-bus-free" },
  { entitlement = "senior_60", kind = "percent", value_bp = 5000, scheme = "senior-bus-half" },
  { entitlement = "disabled", kind = "free", scheme = "disabled-free" },
  { entitlement = "student", kind = "fixed", value_fen = 100, scheme = "student-bus" },
]

[[table.rule]]
scene = "scenic_area"
gross_fare_fen = 11500
concessions = [
  { entitlement = "senior_60", kind = "percent", value_bp = 5000, scheme = "scenic-senior" },
  { entitlement = "senior_70", kind = "free", scheme = "scenic-senior" },
  { entitlement = "disabled", kind = "free", scheme = "scenic-disabled" },
  { entitlement = "student", kind = "percent", value_bp = 5000, scheme = "scenic-student" },
]
"""

# One pair's terms, configured alike on both sides of every pair of the testbed.
SAMPLE_AGREEMENT: dict[str, Any] = {
    "collect_through_home": True,
    "concession_share_bp": {
        "senior-bus-free": 10_000,
        "senior-bus-half": 5_000,
        "disabled-free": 10_000,
        "student-bus": 3_333,
        "scenic-senior": 5_000,
        "scenic-disabled": 10_000,
        "scenic-student": 3_333,
    },
}


def issue_district(certs: Path, code: str, exchange: Path) -> None:
    """What operations staff run first for a district (docs/operations.md).

    ``broker certs init-ca``, ``certs issue --node``, ``certs issue --operator``
    and ``trust export``, through the same functions those commands call.
    """
    paths = DistrictPaths(certs, code)
    at = datetime.now(UTC)
    certops.init_ca(paths, at)
    if not paths.hash_key.exists():
        create_key_file(paths.hash_key)
    certops.issue_to_files(paths, node_identity(code), at)
    certops.issue_to_files(paths, operator_identity(code, OPERATOR_ID), at)
    signed = certops.read_bundle(paths.bundle)
    assert signed is not None  # init_ca wrote it
    (exchange / f"{code}.bundle.json").write_bytes(signed.to_json())


def import_first_bundles(cfg: NodeConfig, exchange: Path) -> None:
    """``broker trust import --first-use`` of every peer's bundle: the first exchange by hand."""
    for peer in cfg.peers:
        signed = SignedBundle.from_json((exchange / f"{peer.district}.bundle.json").read_bytes())
        accept(peer, signed, first_use=True)


# Ports free_port gave this process: two districts of one build (or two tests) never get the
# same one (a CI run saw a node fail to bind a port handed out twice).
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago, below the range the kernel hands
    to outgoing connections: a port from that range (what binding port 0 gives) could be
    taken by one of the many connections a test opens before the node binds it."""
    first_ephemeral = _ephemeral_start()
    rng = random.SystemRandom()
    if len(_HANDED_OUT) > 5_000:
        _HANDED_OUT.clear()
    for _ in range(200):
        port = rng.randrange(10_000, first_ephemeral)
        if port in _HANDED_OUT:  # free now, but maybe about to be bound by whom it was given to
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            _HANDED_OUT.add(port)
            return port
    with socket.socket() as s:  # nothing free down there: any the kernel gives
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ephemeral_start() -> int:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32_768
    return max(low, 10_001)


@dataclass(frozen=True)
class SyntheticCard:
    """A generated card and what the registry was told about it (kept only in memory)."""

    ref: CardRef
    status: str
    valid_until: date
    disabled: bool
    student: bool
    birth_date: date


def make_ssn(area: str, born: date, rng: random.Random) -> str:
    first17 = f"{area}{born:%Y%m%d}{rng.randrange(1000):03d}"
    return first17 + ssn_check_character(first17)


def synthetic_cards(
    district: str, count: int, today: date, rng: random.Random, start: int = 0
) -> list[tuple[SyntheticCard, dict[str, str]]]:
    """``count`` card-holders of ``district``: each card and its import-file row."""
    out = []
    for i in range(start, start + count):
        born = date(1935, 1, 1) + timedelta(days=rng.randrange(0, 30_000))
        if born > today:
            born = today - timedelta(days=rng.randrange(365, 20_000))
        roll = rng.random()
        status = "lost" if roll < 0.04 else "suspended" if roll < 0.07 else "active"
        valid_until = today + timedelta(
            days=rng.randrange(-400, 3650) if rng.random() < 0.05 else rng.randrange(30, 3650)
        )
        age = today.year - born.year
        card = SyntheticCard(
            ref=CardRef(district, f"C{district}{i:07d}"),
            status=status,
            valid_until=valid_until,
            disabled=rng.random() < 0.05,
            student=6 <= age <= 22 and rng.random() < 0.6,
            birth_date=born,
        )
        row = {
            "card_number": card.ref.card_number,
            "ssn": make_ssn(district, born, rng),
            "status": status,
            "disabled": str(card.disabled).lower(),
            "student": str(card.student).lower(),
            "valid_until": valid_until.isoformat(),
        }
        out.append((card, row))
    return out


def write_import_file(path: Path, rows: Sequence[Mapping[str, str]]) -> None:
    """Write an import file; it holds ID numbers, so it is 0600 in a 0700 directory if new."""
    make_private_dirs(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


@dataclass
class DistrictSetup:
    """One district of a testbed: where its files are and the cards it issued."""

    code: str
    paths: DistrictPaths
    config_path: Path
    config: NodeConfig
    operator_id: str
    cards: list[SyntheticCard] = field(default_factory=list)

    @property
    def operator_cert(self) -> Path:
        return self.paths.operator_cert(self.operator_id)

    @property
    def operator_key(self) -> Path:
        return self.paths.operator_key(self.operator_id)

    def operator_channel(self, address: str) -> grpc.aio.Channel:
        """A mutual-TLS channel to this district's node at ``address``, as its operator."""
        return open_channel(
            address,
            node_server_name(self.code),
            self.paths.ca_cert,
            self.operator_cert,
            self.operator_key,
        )


def build(
    root: Path,
    districts: Sequence[str],
    now: datetime,
    cards_per_district: int = 200,
    peers_of: Mapping[str, Sequence[str]] | None = None,
    redis_url: str | None = None,
    seed: int = 110,
    cache: CacheConfig | None = None,
    deadline_ms: int = 300,
    reload_interval_ms: int = 1000,
    max_connection_age_s: int = 300,
    bundle_refresh_s: int = 30,
    max_bundle_age_s: int = TrustConfig.max_bundle_age_s,
    ledger_url: str | None = None,
    ledger_schema_prefix: str = "yk",
    registry_url: str | None = None,
) -> dict[str, DistrictSetup]:
    """Create every district's CA, node and operator certificates, config and registry.

    Args:
        root: directory to write everything into (certs/, var/, configs).
        districts: district codes; each gets a node on a free loopback port.
        now: the instant certificates start from.
        cards_per_district: synthetic card-holders imported into each registry.
        peers_of: which districts each one peers with (default: all the others).
        redis_url: Redis for every node's cache tier (``None``: in-process only).
        seed: makes the synthetic data reproducible.
        cache: cache settings (``redis_url`` above overrides its field).
        deadline_ms: peer call deadline.
        reload_interval_ms: how often nodes re-read their trust files.
        max_connection_age_s: how long a connection lives before it is recycled.
        bundle_refresh_s: how often nodes fetch their peers' trust bundles.
        max_bundle_age_s: a peer bundle older than this fails its health check (the demo,
            whose day clock jumps days on, raises it).
        ledger_url: a PostgreSQL URL for every district's ledger (a schema each,
            ``<ledger_schema_prefix>_<code>``); ``None``: SQLite files.
        registry_url: a PostgreSQL URL for every district's registry, status log and
            handles (a schema each, ``<ledger_schema_prefix>_reg_<code>``); ``None``:
            SQLite files.
    """
    rng = random.Random(seed)
    today = shanghai_day(now)
    ports = {d: free_port() for d in districts}
    certs = root / "certs"
    setups: dict[str, DistrictSetup] = {}
    exchange = root / "exchange"  # stands for the mail or USB stick of the first exchange
    exchange.mkdir(parents=True, exist_ok=True)
    for code in districts:
        issue_district(certs, code, exchange)
    for code in districts:
        paths = DistrictPaths(certs, code)
        peer_codes = (
            list(peers_of[code]) if peers_of is not None else [d for d in districts if d != code]
        )
        fares_path = root / f"fares-{code}.toml"
        fares_path.write_text(f'district = "{code}"\n' + SAMPLE_FARES)
        cfg = NodeConfig(
            district=code,
            listen=f"127.0.0.1:{ports[code]}",
            tls=TLSConfig(
                paths.ca_cert,
                paths.node_cert,
                paths.node_key,
                crl_file=paths.crl,
                reload_interval_ms=reload_interval_ms,
                max_connection_age_s=max_connection_age_s,
            ),
            registry=RegistryConfig(
                None if registry_url else root / "var" / code / "registry.sqlite3",
                url=registry_url,
                schema=f"{ledger_schema_prefix}_reg_{code}" if registry_url else "registry",
            ),
            privacy=PrivacyConfig(paths.hash_key),
            peers=tuple(
                PeerConfig(
                    p,
                    f"127.0.0.1:{ports[p]}",
                    None,
                    node_server_name(p),
                    bundle_file=root / "var" / code / "peers" / f"{p}.bundle.json",
                )
                for p in peer_codes
            ),
            peering=PeeringConfig(deadline_ms),
            recognition=RecognitionConfig(),
            cache=replace(cache or CacheConfig(), redis_url=redis_url),
            trust=TrustConfig(
                bundle_file=paths.bundle,
                bundle_refresh_s=bundle_refresh_s,
                max_bundle_age_s=max_bundle_age_s,
                crl_state_file=root / "var" / code / "crl-state",
            ),
            fares=FaresConfig(fares_path),
            ledger=LedgerConfig(
                path=None if ledger_url else root / "var" / code / "ledger.sqlite3",
                url=ledger_url,
                schema=f"{ledger_schema_prefix}_{code}",
            ),
            settlement=SettlementKeyConfig(paths.settlement_key),
            agreements=tuple(Agreement(p, **SAMPLE_AGREEMENT) for p in peer_codes),
        )
        config_path = root / f"node-{code}.toml"
        config_path.write_text(render_config(cfg))
        loaded = load_config(config_path, env={})
        # The district's files (registry, ledger, import file) in a directory only we may
        # enter, made before the first bundle import creates it with the umask's mode.
        make_private_dirs(root / "var" / code)
        import_first_bundles(loaded, exchange)
        pairs = synthetic_cards(code, cards_per_district, today, rng)
        import_path = root / "var" / code / "cards.csv"
        write_import_file(import_path, [row for _, row in pairs])
        with import_path.open() as fh:
            rows = parse_import(fh, today, load_key_file(paths.hash_key))
        registry = Registry(loaded.registry)
        try:
            registry.upsert(rows, now - timedelta(days=30))  # cards issued before the trips
        finally:
            registry.close()
        setups[code] = DistrictSetup(
            code, paths, config_path, loaded, OPERATOR_ID, [c for c, _ in pairs]
        )
    return setups
