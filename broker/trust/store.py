"""The node's live trust material, reloaded from files without a restart.

A :class:`TrustSnapshot` holds this node's certificate chain and key, and per
district (its own and its peers') the trusted CA certificates, the revocation
lists in force and, for a peer with a trust bundle, that bundle.
:class:`TrustStore` re-reads the files when asked (a timer every
``tls.reload_interval_ms``, and SIGHUP), builds a new snapshot when anything
changed, and swaps it in with one assignment.

Readers only ever read ``store.current``: the server's certificate fetcher
(called by gRPC on its own threads for each new handshake — no I/O there),
the caller verifier and the peer channels.

Trust fails closed. This node's own certificate, key and CA must hold
together, or the reload is refused and the last good snapshot stays (at start:
the node does not start). A district's other files are judged one district at
a time (:mod:`broker.trust.revocation`): a missing, empty, stale or foreign
revocation list, or an unusable bundle, keeps that district's last good
material in force and is reported (:meth:`TrustStore.health`); with nothing
good to keep — at start — this district's own node does not start, and a
peer is not trusted at all. A peer whose bundle is older than
``trust.bundle_hard_age_s`` is not trusted either.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker.core.errors import ConfigError
from broker.core.signing import PublicKey, parse_public_keys
from broker.core.watch import FileWatch
from broker.trust.bundle import Bundle, BundleRefused, SignedBundle, verify
from broker.trust.config import TrustSettings
from broker.trust.pki import ca_id
from broker.trust.revocation import AcceptedCrl, Watermarks, parse_crls

log = structlog.get_logger(__name__)

CRL_HEALTH = "yikatong.trust.crl"


def peer_health_name(district: str) -> str:
    """The health service name of one peer's trust (``yikatong.trust.peer.<code>``)."""
    return f"yikatong.trust.peer.{district}"


@dataclass(frozen=True)
class DistrictTrust:
    """What is in force for one district: its CAs, revocation lists and bundle."""

    anchors: tuple[x509.Certificate, ...]
    roots_pem: bytes
    crls: Mapping[str, AcceptedCrl]
    bundle: Bundle | None = None


@dataclass(frozen=True)
class TrustSnapshot:
    """One consistent set of trust material. Immutable; replaced whole on reload."""

    generation: int
    digest: bytes
    cert_chain_pem: bytes
    key_pem: bytes
    not_after: datetime
    own_district: str
    districts: Mapping[str, DistrictTrust]
    # Why a district's files are not what is in force (kept last good, or untrusted).
    problems: Mapping[str, str] = field(default_factory=dict)
    anchors: Mapping[str, tuple[x509.Certificate, ...]] = field(init=False)
    revoked: frozenset[tuple[str, int]] = field(init=False)
    client_roots_pem: bytes = field(init=False)
    peer_roots_pem: Mapping[str, bytes] = field(init=False)
    bundles: Mapping[str, Bundle] = field(init=False)

    def __post_init__(self) -> None:
        d = self.districts
        put = object.__setattr__
        put(self, "anchors", {k: v.anchors for k, v in d.items()})
        crls = [c for v in d.values() for c in v.crls.values()]
        put(self, "revoked", frozenset((c.issuer, n) for c in crls for n in c.serials))
        put(self, "client_roots_pem", b"".join(v.roots_pem for v in d.values()))
        peers = {k: v.roots_pem for k, v in d.items() if k != self.own_district}
        put(self, "peer_roots_pem", peers)
        put(self, "bundles", {k: v.bundle for k, v in d.items() if v.bundle is not None})

    def __repr__(self) -> str:
        return f"TrustSnapshot(generation={self.generation}, key=<redacted>)"

    def is_revoked(self, ca: x509.Certificate, serial: int) -> bool:
        """Whether the CA ``ca`` has revoked ``serial``."""
        return (ca_id(ca), serial) in self.revoked

    def trusted(self, district: str) -> bool:
        return district in self.districts

    def node_name(self, district: str) -> str | None:
        """The server name ``district``'s bundle pins its node to (``None``: none pinned)."""
        bundle = self.bundles.get(district)
        return bundle.node_name if bundle is not None else None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror}") from exc


def _certs(data: bytes, path: Path) -> tuple[x509.Certificate, ...]:
    try:
        certs = tuple(x509.load_pem_x509_certificates(data))
    except ValueError as exc:
        raise ConfigError(f"{path} holds no PEM certificate") from exc
    for cert in certs:
        try:
            ca_id(cert)
        except x509.ExtensionNotFound:
            raise ConfigError(f"{path}: a CA certificate has no Subject Key Identifier") from None
    return certs


def _judge_crls(
    district: str,
    data: bytes,
    source: str,
    anchors: tuple[x509.Certificate, ...],
    held: Mapping[str, AcceptedCrl],
    marks: Watermarks,
) -> tuple[dict[str, AcceptedCrl], list[str]]:
    """The lists to put in force for ``district``, and what was refused on the way."""
    fresh = parse_crls(data, source, district, anchors)
    out: dict[str, AcceptedCrl] = {}
    refused: list[str] = []
    for cert in anchors:
        issuer = ca_id(cert)
        crl = fresh.get(issuer)
        reason = marks.admits(district, crl) if crl is not None else None
        if crl is not None and reason is None:
            out[issuer] = crl
            continue
        refused.append(reason or f"{source} holds no revocation list of CA {issuer}")
        if issuer in held:
            out[issuer] = held[issuer]  # the last good list of that CA stays
        else:
            raise ConfigError(f"{district}: {refused[-1]}, and none is in force")
    return out, refused


def _district_trust(
    cfg: TrustSettings,
    source: tuple[str, Path | None, Path | None, Path | None],
    held: DistrictTrust | None,
    marks: Watermarks,
    take: Callable[[Path, str], bytes],
    now: datetime,
) -> tuple[DistrictTrust, list[str]]:
    district, ca_file, crl_file, bundle_file = source
    held_crls = held.crls if held is not None else {}
    if bundle_file is not None:
        data = take(bundle_file, "trust bundle")
        try:
            bundle = verify(SignedBundle.from_json(data), district, None, 0)
        except BundleRefused as exc:
            raise ConfigError(f"{bundle_file}: {exc}") from exc
        stale = marks.bundle_admits(district, bundle.sequence, _bundle_digest(bundle))
        if stale is not None:
            raise ConfigError(f"{bundle_file}: {stale}")
        checked = bundle_trust(bundle, str(bundle_file), now, cfg.trust.bundle_hard_age_s)
        crls, refused = _judge_crls(
            district,
            "".join(bundle.crls_pem).encode(),
            str(bundle_file),
            checked.anchors,
            held_crls,
            marks,
        )
        return DistrictTrust(checked.anchors, checked.roots_pem, crls, bundle), refused
    if ca_file is None:
        raise ConfigError(f"district {district} has neither a CA file nor a bundle")
    if crl_file is None:
        raise ConfigError(f"district {district} has no revocation list configured (crl_file)")
    roots = take(ca_file, "CA bundle")
    anchors = _certs(roots, ca_file)
    crl_data = take(crl_file, "revocation list")
    crls, refused = _judge_crls(district, crl_data, str(crl_file), anchors, held_crls, marks)
    return DistrictTrust(anchors, roots, crls), refused


def bundle_trust(bundle: Bundle, source: str, now: datetime, hard_age_s: int) -> DistrictTrust:
    """What a (verified) bundle would put in force, with every check loading applies.

    :func:`broker.peers.bundles.accept` calls it before a fetched bundle is
    stored, so that nothing is written that the next reload would refuse.
    Raises :class:`ConfigError` only.
    """
    age = (now - _issued(bundle)).total_seconds()
    if age > hard_age_s:
        raise ConfigError(
            f"{source}: issued {bundle.issued_at}, older than trust.bundle_hard_age_s "
            f"({hard_age_s} s)"
        )
    roots = "".join(bundle.cas_pem).encode()
    try:
        anchors = _certs(roots, Path(source))
    except ValueError as exc:
        raise ConfigError(f"{source}: a CA certificate does not parse: {exc}") from None
    crls = parse_crls("".join(bundle.crls_pem).encode(), source, bundle.district, anchors)
    missing = {ca_id(a) for a in anchors} - set(crls)
    if missing:
        raise ConfigError(f"{source}: no revocation list of CA {', '.join(sorted(missing))}")
    return DistrictTrust(anchors, roots, crls, bundle)


def _bundle_digest(bundle: Bundle) -> str:
    return hashlib.sha256(bundle.document()).hexdigest()


def _too_old(bundle: Bundle, now: datetime, limit_s: int) -> bool:
    try:
        return (now - _issued(bundle)).total_seconds() > limit_s
    except ConfigError:
        return True


def _issued(bundle: Bundle) -> datetime:
    try:
        at = datetime.fromisoformat(bundle.issued_at)
    except ValueError:
        raise ConfigError(f"bundle of {bundle.district}: issued_at is not a time") from None
    if at.tzinfo is None:
        raise ConfigError(f"bundle of {bundle.district}: issued_at has no time zone")
    return at


def read_snapshot(
    cfg: TrustSettings,
    generation: int,
    previous: TrustSnapshot | None = None,
    marks: Watermarks | None = None,
    now: datetime | None = None,
) -> TrustSnapshot:
    """Read every trust file named by ``cfg`` into a snapshot, or raise ConfigError.

    A district whose files are not usable keeps what ``previous`` had for it;
    without that, this node's own district raises and a peer is left out.
    """
    marks = marks if marks is not None else Watermarks(None)
    now = now or datetime.now(UTC)
    files: list[bytes] = []

    def take(path: Path, what: str) -> bytes:
        data = _read(path, what)
        files.append(path.as_posix().encode() + b"\0" + data)
        return data

    chain = take(cfg.tls.cert_file, "certificate")
    key_pem = take(cfg.tls.key_file, "key")
    leaf = _certs_or_leaf(chain, cfg.tls.cert_file)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{cfg.tls.key_file} holds no usable private key") from exc
    if key.public_key() != leaf.public_key():
        raise ConfigError(f"{cfg.tls.key_file} does not match {cfg.tls.cert_file}")

    districts: dict[str, DistrictTrust] = {}
    problems: dict[str, str] = {}
    sources: list[tuple[str, Path | None, Path | None, Path | None]] = [
        (cfg.district, cfg.tls.ca_file, cfg.tls.crl_file, None)
    ]
    sources += [(p.district, p.ca_file, p.crl_file, p.bundle_file) for p in cfg.peers]
    for source in sources:
        district = source[0]
        held = previous.districts.get(district) if previous is not None else None
        try:
            trust, refused = _district_trust(cfg, source, held, marks, take, now)
        except ConfigError as exc:
            problems[district] = str(exc)
            if held is not None:
                districts[district] = held  # the last good material stays in force
            elif district == cfg.district:
                raise
            continue
        districts[district] = trust
        if refused:
            problems[district] = "; ".join(refused)
    for district, trust in list(districts.items()):  # kept or not, too old is not trusted
        if trust.bundle is not None and _too_old(trust.bundle, now, cfg.trust.bundle_hard_age_s):
            del districts[district]
            problems[district] = (
                f"its bundle was issued {trust.bundle.issued_at}, longer ago than "
                f"trust.bundle_hard_age_s ({cfg.trust.bundle_hard_age_s} s)"
            )
    state = "\0".join(f"{d}={problems.get(d, '')}" for d in sorted(problems) + sorted(districts))
    files.append(state.encode())
    digest = hashlib.sha256(b"\0\0".join(files)).digest()
    return TrustSnapshot(
        generation=generation,
        digest=digest,
        cert_chain_pem=chain,
        key_pem=key_pem,
        not_after=leaf.not_valid_after_utc,
        own_district=cfg.district,
        districts=districts,
        problems=problems,
    )


def _certs_or_leaf(chain: bytes, path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificates(chain)[0]
    except (ValueError, IndexError) as exc:
        raise ConfigError(f"{path} holds no PEM certificate") from exc


def trust_files(cfg: TrustSettings) -> list[Path]:
    """Every file a snapshot is read from."""
    files = [cfg.tls.cert_file, cfg.tls.key_file, cfg.tls.ca_file, cfg.tls.crl_file]
    for p in cfg.peers:
        files += [f for f in (p.ca_file, p.crl_file, p.bundle_file) if f is not None]
    return files


class TrustStore:
    """Holds the current :class:`TrustSnapshot`; :meth:`reload` swaps in a new one."""

    def __init__(
        self, cfg: TrustSettings, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self._cfg = cfg
        self._clock = clock
        self._watch = FileWatch(trust_files(cfg))
        self._marks = Watermarks(cfg.trust.crl_state_file)
        self._marks_saved = True
        self.current = read_snapshot(cfg, 1, None, self._marks, clock())
        self._took_effect(self.current)

    def changed(self) -> bool:
        """Whether any trust file looks different (see :mod:`broker.core.watch`)."""
        return self._watch.changed()

    def reload(self) -> bool:
        """Re-read the files; True when a new snapshot took effect."""
        self._watch.mark_seen()
        try:
            new = read_snapshot(
                self._cfg, self.current.generation + 1, self.current, self._marks, self._clock()
            )
        except ConfigError as exc:
            log.error("trust_reload_refused", reason=str(exc))
            return False
        except Exception as exc:  # a check this module missed: never let the watcher die
            log.exception("trust_reload_failed", reason=type(exc).__name__)
            return False
        if new.digest == self.current.digest:
            return False
        self.current = new
        self._took_effect(new)
        log.info(
            "trust_reloaded",
            generation=new.generation,
            revoked=len(new.revoked),
            not_after=new.not_after.isoformat(),
        )
        return True

    def _took_effect(self, snap: TrustSnapshot) -> None:
        self._marks_saved = True
        for district, trust in snap.districts.items():
            bundle = trust.bundle
            mark = (bundle.sequence, _bundle_digest(bundle)) if bundle is not None else None
            try:
                self._marks.record(district, trust.crls, mark)
            except OSError as exc:  # in force now, but a restart might forget: say so
                self._marks_saved = False
                log.error("revocation_state_not_saved", reason=str(exc))
        for district, problem in snap.problems.items():
            kept = "kept last good" if snap.trusted(district) else "not trusted"
            log.error("trust_files_refused", district=district, state=kept, reason=problem)

    def health(self) -> dict[str, bool]:
        """Per-component trust health: :data:`CRL_HEALTH` and one name per peer.

        The revocation lists are unhealthy when one has lapsed (its
        ``next_update`` passed: run ``broker certs renew-due``) or a file was
        refused; a peer is unhealthy when it is not trusted, its files were
        refused, or its bundle is older than ``trust.max_bundle_age_s``.
        Unhealthy never refuses traffic by itself; a peer bundle past
        ``trust.bundle_hard_age_s`` is dropped at the next reload.
        """
        now = self._clock()
        snap = self.current
        lapsed = [
            (d, c.issuer)
            for d, t in snap.districts.items()
            for c in t.crls.values()
            if c.next_update is not None and c.next_update < now
        ]
        out = {
            CRL_HEALTH: not lapsed and self._cfg.district not in snap.problems and self._marks_saved
        }
        for peer in self._cfg.peers:
            bundle = snap.bundles.get(peer.district)
            fresh = bundle is None or (
                (now - _issued(bundle)).total_seconds() <= self._cfg.trust.max_bundle_age_s
            )
            out[peer_health_name(peer.district)] = (
                snap.trusted(peer.district) and peer.district not in snap.problems and fresh
            )
        return out

    def too_old(self) -> bool:
        """Whether a trusted peer's bundle passed the hard age limit (a reload drops it)."""
        now = self._clock()
        limit = self._cfg.trust.bundle_hard_age_s
        return any(_too_old(b, now, limit) for b in self.current.bundles.values())


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
