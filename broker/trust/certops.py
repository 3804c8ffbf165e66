"""The operations staff (and their timer) run on a district's certificate store.

Where the files live, and the reads, is :mod:`broker.trust.certstore`; the
revocation lists :mod:`broker.trust.crls`; the node's epoch
:mod:`broker.trust.epochs`; what ``certs status`` reports
:mod:`broker.trust.certstatus`. Every operation here that changes the store
holds the store lock (:func:`store_lock`) from its first read to its last
write, so concurrent operations — a timer's ``renew-due`` beside an
operator's ``revoke`` — apply one after the other: no revocation is lost and
no two bundles share a sequence number.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from broker.trust.bundle import Bundle, SignedBundle, issued_now, read_served, sign
from broker.trust.certstatus import CertStatus as CertStatus
from broker.trust.certstatus import leaf_statuses as leaf_statuses
from broker.trust.certstatus import status as _status
from broker.trust.certstore import CertOpsError as CertOpsError
from broker.trust.certstore import DistrictPaths as DistrictPaths
from broker.trust.certstore import IssuedEntry as IssuedEntry
from broker.trust.certstore import active_ca as active_ca
from broker.trust.certstore import active_ca_id as active_ca_id
from broker.trust.certstore import current_certificate as current_certificate
from broker.trust.certstore import dns_names
from broker.trust.certstore import identity_of as identity_of
from broker.trust.certstore import leaf_certificates as leaf_certificates
from broker.trust.certstore import lifetime_days as lifetime_days
from broker.trust.certstore import load_ca as load_ca
from broker.trust.certstore import read_bundle as read_bundle
from broker.trust.certstore import store_lock as store_lock
from broker.trust.certstore import trusted_ca_ids as trusted_ca_ids
from broker.trust.crls import (
    RENEW_MARGIN,
    add_revocation,
    lists_for,
    read_crls,
    renew_lists,
    write_crls,
)
from broker.trust.epochs import NodeEpoch, epoch_names, pinned_name, read_epoch, write_epoch
from broker.trust.identity import Identity, Role, node_identity, parse_spiffe_id
from broker.trust.pki import (
    CA_DAYS,
    LEAF_DAYS,
    KeyPair,
    append_line,
    ca_id,
    create_ca,
    crl_issuer_id,
    crl_number,
    crl_pem,
    issue,
    issuer_id,
    load_crls,
    save,
    write_private,
    write_public,
)

# ``renew-due`` republishes a bundle older than this even when nothing in it
# changed, so that peers can tell a withheld bundle from a quiet district.
BUNDLE_MAX_AGE = timedelta(hours=24)


# ----------------------------------------------------------------- CAs and bundle


def _publish(paths: DistrictPaths, ids: list[str], now: datetime) -> None:
    """Write the trust bundle and the revocation lists for exactly the CAs ``ids``."""
    bundle = b"".join(paths.ca_files(i)[0].read_bytes() for i in ids)
    # Revocations first, then the bundle: a reader never trusts a CA without its list.
    write_crls(paths, lists_for(paths, ids, now), ids)
    write_public(paths.ca_cert, bundle)
    publish_bundle(paths, now)


def init_ca(paths: DistrictPaths, now: datetime, days: int = CA_DAYS) -> KeyPair:
    """Create the district's first CA, its empty revocation list and its bundle."""
    with store_lock(paths, create=True):
        if paths.active_file.exists():
            raise CertOpsError(f"district {paths.district} already has a CA under {paths.root}")
        ca = create_ca(paths.district, now, days)
        ident = ca_id(ca.cert)
        save(ca, *paths.ca_files(ident))
        write_public(paths.active_file, ident.encode())
        if not paths.settlement_key.exists():
            key = ed25519.Ed25519PrivateKey.generate()
            write_private(
                paths.settlement_key,
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
            )
        _publish(paths, [ident], now)
        return ca


def settlement_public_keys(paths: DistrictPaths) -> tuple[tuple[str, str], ...]:
    """``(key id, public key PEM)`` of the district's settlement signing key, if it has one."""
    if not paths.settlement_key.exists():
        return ()
    key = serialization.load_pem_private_key(paths.settlement_key.read_bytes(), password=None)
    pub = key.public_key()
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    pem = pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return ((hashlib.sha256(raw).hexdigest()[:16], pem.decode()),)


def _draft(paths: DistrictPaths, now: datetime) -> Bundle:
    cas = tuple(
        c.public_bytes(serialization.Encoding.PEM).decode()
        for c in x509.load_pem_x509_certificates(paths.ca_cert.read_bytes())
    )
    # The newest list of each trusted CA, from crl.pem or the published bundle: a crl.pem
    # put back older must not publish a list that forgets revocations (it is mended too).
    ids = trusted_ca_ids(paths)
    lists = read_crls(paths)
    on_disk = {crl_issuer_id(c): crl_number(c) for c in load_crls(paths.crl.read_bytes())}
    if any(on_disk.get(i) != crl_number(lists[i]) for i in ids if i in lists):
        write_crls(paths, lists, ids)
    crls = tuple(crl_pem(lists[i]).decode() for i in ids if i in lists)
    name = pinned_name(paths.district, read_epoch(paths))
    keys = settlement_public_keys(paths)
    return Bundle(paths.district, 1, issued_now(now), cas, crls, keys, node_name=name)


def publish_bundle(
    paths: DistrictPaths, now: datetime, max_age: timedelta | None = None
) -> SignedBundle:
    """Sign and write the district's trust bundle when its content changed; return the bundle.

    The sequence grows by one with each bundle written. With ``max_age``, a held
    bundle issued that long ago or longer is re-signed even if nothing changed
    (new sequence and ``issued_at``, same content).
    """
    with store_lock(paths):
        draft = _draft(paths, now)
        held = read_bundle(paths.bundle)
        if held is not None:
            previous = Bundle.parse(held.document)
            aged = (
                max_age is not None and now - datetime.fromisoformat(previous.issued_at) >= max_age
            )
            if previous.same_content(draft) and not aged:
                return held
            draft = replace(draft, sequence=previous.sequence + 1)
        signed = sign(draft, active_ca(paths))
        write_public(paths.bundle, signed.to_json())
        return signed


class RotationStage(enum.StrEnum):
    PUBLISH = "publish"  # new CA created and published; the old one still signs
    ACTIVATE = "activate"  # the new CA signs; node and operators re-issued by it
    RETIRE = "retire"  # the old CA leaves the bundle; its key is destroyed


def rotate_ca(paths: DistrictPaths, stage: RotationStage, now: datetime) -> str:
    """One stage of a CA rotation; returns what it did, for the operator.

    ``publish`` must reach every peer (bundle refresh) before ``activate``;
    every certificate of the old CA must be replaced before ``retire``.
    """
    with store_lock(paths):
        trusted = trusted_ca_ids(paths)
        active = active_ca_id(paths)
        if stage is RotationStage.PUBLISH:
            return _publish_new_ca(paths, trusted, active, now)
        if stage is RotationStage.ACTIVATE:
            return _activate(paths, trusted, active, now)
        return _retire(paths, trusted, active, now)


def _publish_new_ca(paths: DistrictPaths, trusted: list[str], active: str, now: datetime) -> str:
    if len(trusted) > 1:
        raise CertOpsError("a rotation is already under way: activate or retire it first")
    new = create_ca(paths.district, now)
    ident = ca_id(new.cert)
    save(new, *paths.ca_files(ident))
    _publish(paths, [*trusted, ident], now)
    return f"CA {ident} published beside {active}; {active} still signs"


def _activate(paths: DistrictPaths, trusted: list[str], active: str, now: datetime) -> str:
    pending = [i for i in trusted if i != active]
    if not pending:
        raise CertOpsError("no published CA to activate: run publish first")
    write_public(paths.active_file, pending[0].encode())
    renewed = [str(p) for p in reissue_all(paths, now)]
    return f"CA {pending[0]} now signs; re-issued {len(renewed)} certificate(s)"


def _retire(paths: DistrictPaths, trusted: list[str], active: str, now: datetime) -> str:
    old = [i for i in trusted if i != active]
    if not old:
        raise CertOpsError("nothing to retire: only the active CA is trusted")
    if trusted[-1] != active:
        raise CertOpsError("the published CA does not sign yet: run activate first")
    still = [s for s in leaf_statuses(paths, now) if s.issuer in old and not s.expired]
    if still:
        raise CertOpsError(
            f"{len(still)} certificate(s) still issued by the old CA: run activate/renew first"
        )
    _publish(paths, [active], now)
    for i in old:
        paths.ca_files(i)[1].unlink(missing_ok=True)  # the retired key is destroyed
    return f"CA {', '.join(old)} retired; only {active} is trusted"


# ----------------------------------------------------------------- the issuance log


def _log_issued(paths: DistrictPaths, cert: x509.Certificate, ident: Identity, issuer: str) -> None:
    entry = {
        "serial": f"{cert.serial_number:x}",
        "identity": ident.spiffe_id,
        "issuer": issuer,
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
    }
    append_line(paths.issued_log, json.dumps(entry))


def issued_entries(paths: DistrictPaths) -> list[IssuedEntry]:
    """Every certificate the district issued, oldest first (from ``issued.jsonl``)."""
    if not paths.issued_log.exists():
        return []
    out = []
    for number, line in enumerate(paths.issued_log.read_text().splitlines(), 1):
        try:
            e = json.loads(line)
            out.append(
                IssuedEntry(
                    int(e["serial"], 16),
                    parse_spiffe_id(e["identity"]),
                    str(e["issuer"]),
                    str(e["not_before"]),
                    str(e["not_after"]),
                )
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise CertOpsError(f"{paths.issued_log} line {number} is malformed: {exc}") from None
    return out


# ----------------------------------------------------------------- leaves


def issue_to_files(
    paths: DistrictPaths, ident: Identity, now: datetime, days: int = LEAF_DAYS
) -> tuple[Path, Path]:
    """Issue (or replace) a node or operator certificate with the active CA; return (cert, key).

    A node certificate names the node's epoch(s) too (:func:`epochs.epoch_names`).
    """
    if ident.district != paths.district:
        raise CertOpsError(f"{ident.spiffe_id} is not of district {paths.district}")
    with store_lock(paths):
        ca = active_ca(paths)
        extra = epoch_names(paths.district, read_epoch(paths)) if ident.role is Role.NODE else ()
        pair = issue(ca, ident, now, days, extra_dns=extra)
        # Logged first: a certificate that reached a file is always in the log (revocable).
        _log_issued(paths, pair.cert, ident, ca_id(ca.cert))
        cert_path, key_path = paths.leaf_files(ident)
        save(pair, cert_path, key_path)
        return cert_path, key_path


def reissue_all(paths: DistrictPaths, now: datetime) -> list[Path]:
    """Re-issue every leaf with the active CA, keeping each one's lifetime."""
    with store_lock(paths):
        return [
            issue_to_files(paths, ident, now, lifetime_days(cert))[0]
            for ident, cert in leaf_certificates(paths)
        ]


@dataclass(frozen=True)
class Renewal:
    """What one ``renew-due`` did.

    Attributes:
        certificates: the certificate files re-issued.
        crls: ids of the CAs whose revocation list was re-signed.
        bundle: the bundle it published (content changed, or the held one aged),
            else ``None``.
    """

    certificates: tuple[Path, ...]
    crls: tuple[str, ...]
    bundle: SignedBundle | None


def renew_due(
    paths: DistrictPaths,
    now: datetime,
    crl_margin: timedelta = RENEW_MARGIN,
    bundle_max_age: timedelta = BUNDLE_MAX_AGE,
) -> Renewal:
    """What a timer runs: renew what is due, all under one hold of the store lock.

    Re-issues every leaf past half its lifetime, re-signs every revocation list
    lapsing within ``crl_margin``, and republishes the bundle if either changed
    it or it is ``bundle_max_age`` old.
    """
    with store_lock(paths):
        active_ca_id(paths)  # a district without a CA is an error, not "nothing due"
        renewed = []
        for ident, cert in leaf_certificates(paths):
            lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
            if now - cert.not_valid_before_utc >= lifetime / 2:
                renewed.append(issue_to_files(paths, ident, now, lifetime_days(cert))[0])
        crls = renew_lists(paths, now, crl_margin)
        before = read_bundle(paths.bundle)
        after = publish_bundle(paths, now, max_age=bundle_max_age)
        return Renewal(tuple(renewed), tuple(crls), None if after == before else after)


# ----------------------------------------------------------------- revocation and rotation


@dataclass(frozen=True)
class Revocation:
    """A serial listed in its CA's revocation list, and the bundle that carries the list."""

    serial: str
    issuer: str
    bundle: SignedBundle


def parse_serial(serial_hex: str) -> int:
    try:
        return int(serial_hex.lower().removeprefix("0x"), 16)
    except ValueError:
        raise CertOpsError("serial must be hexadecimal, as `certs status` prints it") from None


def _revoke_listed(paths: DistrictPaths, serial: int, issuer: str, now: datetime) -> Revocation:
    if issuer not in trusted_ca_ids(paths):
        raise CertOpsError(f"CA {issuer} is retired: its certificates are no longer trusted anyway")
    add_revocation(paths, issuer, serial, now)
    return Revocation(f"{serial:x}", issuer, publish_bundle(paths, now))


def _refuse_node_revocation_mid_move(paths: DistrictPaths) -> None:
    epoch = read_epoch(paths)
    if epoch.pending:
        raise CertOpsError(
            f"the node is moving to epoch {epoch.next}: deploy its new certificate and run "
            "`certs publish-epoch` first, then revoke the old serial (--force revokes it now: "
            "the node's calls to peers fail until its new certificate is deployed)"
        )


def revoke(paths: DistrictPaths, serial_hex: str, now: datetime, force: bool = False) -> Revocation:
    """Add a serial to the revocation list of the CA that issued it, and republish.

    A node serial is refused while a node epoch move is pending (see
    :func:`publish_epoch`) unless ``force``.
    """
    serial = parse_serial(serial_hex)
    with store_lock(paths):
        found = [e for e in issued_entries(paths) if e.serial == serial]
        if not found:
            raise CertOpsError(f"serial {serial:x} was not issued by district {paths.district}")
        if found[-1].identity.role is Role.NODE and not force:
            _refuse_node_revocation_mid_move(paths)
        return _revoke_listed(paths, serial, found[-1].issuer, now)


@dataclass(frozen=True)
class Rotation:
    """A certificate replaced by ``certs rotate``."""

    path: Path
    old_serial: str
    new_serial: str
    revoked: Revocation | None
    epoch: NodeEpoch


def rotate(
    paths: DistrictPaths,
    ident: Identity,
    now: datetime,
    revoke_old: bool = False,
    next_epoch: bool = False,
) -> Rotation:
    """Replace ``ident``'s certificate now: new key, same identity and lifetime.

    ``revoke_old`` (operators) revokes the replaced serial in the same
    operation. ``next_epoch`` (the node) begins a move to the next node epoch:
    the new certificate names both; the old serial is revoked after
    :func:`publish_epoch`, once the new certificate is deployed.
    """
    if revoke_old and ident.role is Role.NODE:
        raise CertOpsError(
            "the node's old certificate is revoked once its new one is deployed: rotate with "
            "--next-epoch, deploy, `certs publish-epoch`, then `certs revoke --serial OLD`"
        )
    if next_epoch and ident.role is not Role.NODE:
        raise CertOpsError("--next-epoch moves the node's epoch: use it with --node")
    with store_lock(paths):
        try:
            old = current_certificate(paths, ident)
        except CertOpsError:
            raise CertOpsError(
                f"no certificate for {ident.spiffe_id} to rotate: issue one first"
            ) from None
        if revoke_old and issuer_id(old) not in trusted_ca_ids(paths):
            raise CertOpsError(f"CA {issuer_id(old)} of the old certificate is retired")
        if next_epoch:
            write_epoch(paths, read_epoch(paths).begin_move())
        cert_path, _ = issue_to_files(paths, ident, now, lifetime_days(old))
        revoked = None
        if revoke_old:
            revoked = _revoke_listed(paths, old.serial_number, issuer_id(old), now)
        new = x509.load_pem_x509_certificate(cert_path.read_bytes())
        return Rotation(
            cert_path,
            f"{old.serial_number:x}",
            f"{new.serial_number:x}",
            revoked,
            read_epoch(paths),
        )


def publish_epoch(paths: DistrictPaths, now: datetime) -> SignedBundle:
    """Complete a node epoch move: the next epoch becomes current and the bundle names it.

    Refused unless a move is pending and the node's certificate names the next
    epoch (``certs rotate --node --next-epoch`` issued it).
    """
    with store_lock(paths):
        moved = read_epoch(paths).complete_move()
        name = pinned_name(paths.district, moved)
        cert = current_certificate(paths, node_identity(paths.district))
        if name not in dns_names(cert):
            raise CertOpsError(
                f"the node certificate does not name {name}: run `certs rotate --node "
                "--next-epoch` and deploy it first"
            )
        write_epoch(paths, moved)
        return publish_bundle(paths, now)


# ----------------------------------------------------------------- status


def status(paths: DistrictPaths, now: datetime, all_issued: bool = False) -> list[CertStatus]:
    """Every trusted CA and every certificate held now; ``all_issued``: replaced ones too."""
    return _status(paths, now, issued_entries(paths) if all_issued else ())


def peers_behind(bundle_file: Path, peers: list[str]) -> list[tuple[str, int | None, int]]:
    """Peers that have not fetched the bundle at ``bundle_file``: (district, fetched, current).

    Read from what the node notes when it serves the bundle
    (:func:`broker.trust.bundle.note_served`).
    """
    held = read_bundle(bundle_file)
    if held is None:
        raise CertOpsError(f"no bundle at {bundle_file}")
    current = Bundle.parse(held.document).sequence
    served = read_served(bundle_file)
    out = []
    for d in peers:
        fetched = served[d][0] if d in served else None
        if fetched is None or fetched < current:
            out.append((d, fetched, current))
    return out
