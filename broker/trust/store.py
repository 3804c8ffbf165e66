"""The node's live trust material, reloaded from files without a restart.

A :class:`TrustSnapshot` holds this node's certificate chain and key, the CA
certificates trusted for each district (its own and its peers') and the
serials their revocation lists name. :class:`TrustStore` re-reads the files
when asked (a timer every ``tls.reload_interval_ms``, and SIGHUP), builds a
new snapshot when anything changed, and swaps it in with one assignment.

Readers only ever read ``store.current``: the server's certificate fetcher
(called by gRPC on its own threads for each new handshake — no I/O there),
the caller verifier and the peer channels. A set of files that does not hold
together — a key that does not match its certificate (a rotation caught half
way), a file that does not parse, a revocation list not signed by its CA — is
refused with an error in the log, and the last good snapshot stays in force.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker.core.errors import ConfigError
from broker.core.signing import PublicKey, parse_public_keys
from broker.core.watch import FileWatch
from broker.trust.bundle import Bundle, BundleRefused, SignedBundle, verify
from broker.trust.config import TrustSettings
from broker.trust.pki import ca_id, crl_issuer_id, load_crls

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class TrustSnapshot:
    """One consistent set of trust material. Immutable; replaced whole on reload."""

    generation: int
    digest: bytes
    cert_chain_pem: bytes
    key_pem: bytes
    not_after: datetime
    anchors: Mapping[str, tuple[x509.Certificate, ...]]
    revoked: frozenset[tuple[str, int]]
    client_roots_pem: bytes
    peer_roots_pem: Mapping[str, bytes]
    bundles: Mapping[str, Bundle]

    def __repr__(self) -> str:
        return f"TrustSnapshot(generation={self.generation}, key=<redacted>)"

    def is_revoked(self, ca: x509.Certificate, serial: int) -> bool:
        """Whether the CA ``ca`` has revoked ``serial``."""
        return (ca_id(ca), serial) in self.revoked


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror}") from exc


def _certs(data: bytes, path: Path) -> tuple[x509.Certificate, ...]:
    try:
        return tuple(x509.load_pem_x509_certificates(data))
    except ValueError as exc:
        raise ConfigError(f"{path} holds no PEM certificate") from exc


def _revocations(
    data: bytes, path: Path, cas: tuple[x509.Certificate, ...]
) -> set[tuple[str, int]]:
    try:
        crls = load_crls(data)
    except ValueError as exc:
        raise ConfigError(f"{path} holds a revocation list that does not parse") from exc
    by_id = {ca_id(c): c for c in cas}
    out: set[tuple[str, int]] = set()
    for crl in crls:
        issuer = by_id.get(crl_issuer_id(crl))
        if issuer is None:
            continue  # a list of a CA no longer trusted: nothing it says matters
        pub = issuer.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(pub):
            raise ConfigError(f"{path}: a revocation list is not signed by its CA")
        out.update((crl_issuer_id(crl), r.serial_number) for r in crl)
    return out


def read_snapshot(cfg: TrustSettings, generation: int) -> TrustSnapshot:
    """Read every trust file named by ``cfg`` into a snapshot, or raise ConfigError."""
    files: list[bytes] = []

    def take(path: Path, what: str) -> bytes:
        data = _read(path, what)
        files.append(path.as_posix().encode() + b"\0" + data)
        return data

    chain = take(cfg.tls.cert_file, "certificate")
    key_pem = take(cfg.tls.key_file, "key")
    leaf = _certs(chain, cfg.tls.cert_file)[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError as exc:
        raise ConfigError(f"{cfg.tls.key_file} holds no private key") from exc
    if key.public_key() != leaf.public_key():
        raise ConfigError(f"{cfg.tls.key_file} does not match {cfg.tls.cert_file}")

    anchors: dict[str, tuple[x509.Certificate, ...]] = {}
    revoked: set[tuple[str, int]] = set()
    roots: dict[str, bytes] = {}
    bundles: dict[str, Bundle] = {}
    sources: list[tuple[str, Path | None, Path | None, Path | None]] = [
        (cfg.district, cfg.tls.ca_file, cfg.tls.crl_file, None)
    ]
    sources += [(p.district, p.ca_file, p.crl_file, p.bundle_file) for p in cfg.peers]
    for district, ca_file, crl_file, bundle_file in sources:
        if bundle_file is not None:
            data = take(bundle_file, "trust bundle")
            try:
                bundle = verify(SignedBundle.from_json(data), district, None, 0)
            except BundleRefused as exc:
                raise ConfigError(f"{bundle_file}: {exc}") from exc
            bundles[district] = bundle
            roots[district] = "".join(bundle.cas_pem).encode()
            anchors[district] = _certs(roots[district], bundle_file)
            crls = "".join(bundle.crls_pem).encode()
            revoked |= _revocations(crls, bundle_file, anchors[district])
            continue
        if ca_file is None:
            raise ConfigError(f"district {district} has neither a CA file nor a bundle")
        data = take(ca_file, "CA bundle")
        anchors[district] = _certs(data, ca_file)
        roots[district] = data
        if crl_file is not None and crl_file.exists():
            revoked |= _revocations(take(crl_file, "revocation list"), crl_file, anchors[district])
    digest = hashlib.sha256(b"\0\0".join(files)).digest()
    return TrustSnapshot(
        generation=generation,
        digest=digest,
        cert_chain_pem=chain,
        key_pem=key_pem,
        not_after=leaf.not_valid_after_utc,
        anchors=anchors,
        revoked=frozenset(revoked),
        client_roots_pem=b"".join(roots.values()),
        peer_roots_pem={d: r for d, r in roots.items() if d != cfg.district},
        bundles=bundles,
    )


def trust_files(cfg: TrustSettings) -> list[Path]:
    """Every file a snapshot is read from."""
    files = [cfg.tls.cert_file, cfg.tls.key_file, cfg.tls.ca_file]
    if cfg.tls.crl_file is not None:
        files.append(cfg.tls.crl_file)
    for p in cfg.peers:
        files += [f for f in (p.ca_file, p.crl_file, p.bundle_file) if f is not None]
    return files


class TrustStore:
    """Holds the current :class:`TrustSnapshot`; :meth:`reload` swaps in a new one."""

    def __init__(self, cfg: TrustSettings) -> None:
        self._cfg = cfg
        self._watch = FileWatch(trust_files(cfg))
        self.current = read_snapshot(cfg, 1)

    def changed(self) -> bool:
        """Whether any trust file looks different (see :mod:`broker.core.watch`)."""
        return self._watch.changed()

    def reload(self) -> bool:
        """Re-read the files; True when a new snapshot took effect."""
        self._watch.mark_seen()
        try:
            new = read_snapshot(self._cfg, self.current.generation + 1)
        except ConfigError as exc:
            log.error("trust_reload_refused", reason=str(exc))
            return False
        except (InvalidSignature, ValueError, TypeError) as exc:
            log.error("trust_reload_refused", reason=type(exc).__name__)
            return False
        if new.digest == self.current.digest:
            return False
        self.current = new
        log.info(
            "trust_reloaded",
            generation=self.current.generation,
            revoked=len(new.revoked),
            not_after=new.not_after.isoformat(),
        )
        return True


def bundle_keys(
    current: Callable[[], TrustSnapshot],
) -> Callable[[str], Mapping[str, PublicKey]]:
    """Each peer district's settlement keys, from its trust bundle in the current snapshot."""
    cache: dict[tuple[int, str], dict[str, PublicKey]] = {}

    def keys(district: str) -> Mapping[str, PublicKey]:
        snap = current()
        slot = (snap.generation, district)
        if slot not in cache:
            bundle = snap.bundles.get(district)
            cache[slot] = parse_public_keys(bundle.settlement_keys) if bundle else {}
        return cache[slot]

    return keys
