"""The district's revocation lists (``crl.pem``): one per trusted CA, numbered, kept current.

Every new list of a CA carries a CRL number one above its previous list
(:func:`broker.trust.pki.crl_number`), whether it adds a serial or only
re-signs the same entries: readers keep the list with the highest number. A
list is valid for :data:`broker.trust.pki.CRL_DAYS` (7) days; the timer's
``renew-due`` re-signs it once less than :data:`RENEW_MARGIN` is left, so a
timer that misses up to three daily runs still never lets one lapse.

These functions write ``crl.pem`` only; publishing the bundle that carries
the lists is the caller's (:mod:`broker.trust.certops`), under the store lock.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from cryptography import x509

from broker.trust.bundle import Bundle, SignedBundle
from broker.trust.certstore import DistrictPaths, load_ca, trusted_ca_ids
from broker.trust.pki import build_crl, crl_issuer_id, crl_number, crl_pem, load_crls, write_public

RENEW_MARGIN = timedelta(days=3)

CRLs = dict[str, x509.CertificateRevocationList]


def read_crls(paths: DistrictPaths) -> CRLs:
    """The newest list of each CA, by issuing CA id, from ``crl.pem`` and the published bundle.

    The bundle is read too so that a ``crl.pem`` lost or put back older never
    makes the next list forget a revocation or reuse a number peers have seen.
    """
    found: list[x509.CertificateRevocationList] = []
    if paths.crl.exists():
        found += load_crls(paths.crl.read_bytes())
    if paths.bundle.exists():
        bundle = Bundle.parse(SignedBundle.from_json(paths.bundle.read_bytes()).document)
        found += load_crls("".join(bundle.crls_pem).encode())
    lists: CRLs = {}
    for crl in found:
        issuer = crl_issuer_id(crl)
        if issuer not in lists or crl_number(crl) > crl_number(lists[issuer]):
            lists[issuer] = crl
    return lists


def write_crls(paths: DistrictPaths, crls: CRLs, ids: list[str]) -> None:
    """Write the lists of exactly the CAs ``ids``, in that order."""
    write_public(paths.crl, b"".join(crl_pem(crls[i]) for i in ids if i in crls))


def lists_for(paths: DistrictPaths, ids: list[str], now: datetime) -> CRLs:
    """The current list of each CA in ``ids``; a first, empty one (number 1) for a new CA."""
    lists = read_crls(paths)
    for i in ids:
        if i not in lists:  # (not `or`: an empty list is falsy)
            lists[i] = build_crl(load_ca(paths, i), [], 1, now)
    return {i: lists[i] for i in ids}


def _entries(crl: x509.CertificateRevocationList | None) -> list[tuple[int, datetime]]:
    return [] if crl is None else [(r.serial_number, r.revocation_date_utc) for r in crl]


def _next_number(crl: x509.CertificateRevocationList | None) -> int:
    return 1 if crl is None else crl_number(crl) + 1


def add_revocation(paths: DistrictPaths, issuer: str, serial: int, now: datetime) -> None:
    """List ``serial`` in the list of CA ``issuer`` (a trusted CA), under a new number."""
    trusted = trusted_ca_ids(paths)
    crls = read_crls(paths)
    current = crls.get(issuer)
    entries = _entries(current)
    if serial not in {s for s, _ in entries}:
        entries.append((serial, now))
    crls[issuer] = build_crl(load_ca(paths, issuer), entries, _next_number(current), now)
    write_crls(paths, crls, trusted)


def due(crl: x509.CertificateRevocationList, now: datetime, margin: timedelta) -> bool:
    """Whether ``crl`` lapses (``next_update``) within ``margin`` of ``now``, or has lapsed."""
    next_update = crl.next_update_utc
    return next_update is None or next_update - now < margin


def renew_lists(paths: DistrictPaths, now: datetime, margin: timedelta = RENEW_MARGIN) -> list[str]:
    """Re-sign every trusted CA's list that is :func:`due`: same entries, next number.

    Returns the ids of the CAs whose list was re-signed (``crl.pem`` is written
    only if there is one).
    """
    trusted = trusted_ca_ids(paths)
    crls = read_crls(paths)
    renewed = [i for i in trusted if i in crls and due(crls[i], now, margin)]
    for i in renewed:
        old = crls[i]
        crls[i] = build_crl(load_ca(paths, i), _entries(old), _next_number(old), now)
    if renewed:
        write_crls(paths, crls, trusted)
    return renewed


def revoked_serials(paths: DistrictPaths) -> set[tuple[str, int]]:
    """``(issuing CA id, serial)`` of every certificate listed in ``crl.pem``."""
    return {(i, r.serial_number) for i, c in read_crls(paths).items() for r in c}
