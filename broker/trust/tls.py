"""Mutual-TLS material and checking callers' certificates in code.

gRPC verifies that a client certificate chains to *some* CA of the server's
bundle, but hands the application only the leaf. :class:`CallerVerifier`
therefore checks, per certificate (and caches the verdict), that the leaf
names exactly one yikatong identity, was issued by a CA of the district it
names, and is within its validity period — so district A's CA can never
vouch for a certificate that names district B.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from broker.core.errors import PermissionDenied, Unauthenticated
from broker.trust.identity import Identity, parse_spiffe_id
from broker.trust.store import TrustSnapshot, TrustStore


def spiffe_ids(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [
        u
        for u in san.value.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith("spiffe://")
    ]


@dataclass(frozen=True, slots=True)
class _Verdict:
    identity: Identity
    not_before: datetime
    not_after: datetime


class CallerVerifier:
    """Turns a caller's leaf certificate (PEM) into an :class:`Identity`, or refuses it.

    Verdicts are cached per certificate for one trust generation: a reload
    (new CAs, a revocation) clears them, so the next call is judged afresh.
    """

    def __init__(self, store: TrustStore, max_cached: int = 4096) -> None:
        self._store = store
        self._generation = store.current.generation
        self._cache: OrderedDict[bytes, _Verdict] = OrderedDict()
        self._max = max_cached

    def identify(self, leaf_pem: bytes, now: datetime) -> Identity:
        snap = self._store.current
        if snap.generation != self._generation:
            self._cache.clear()
            self._generation = snap.generation
        verdict = self._cache.get(leaf_pem)
        if verdict is None:
            verdict = self._verify(leaf_pem, snap)
            self._cache[leaf_pem] = verdict
            if len(self._cache) > self._max:
                self._cache.popitem(last=False)
        if not verdict.not_before <= now <= verdict.not_after:
            raise Unauthenticated("certificate is outside its validity period")
        return verdict.identity

    def _verify(self, leaf_pem: bytes, snap: TrustSnapshot) -> _Verdict:
        try:
            leaf = x509.load_pem_x509_certificate(leaf_pem)
        except ValueError as exc:
            raise Unauthenticated("caller certificate cannot be parsed") from exc
        ids = spiffe_ids(leaf)
        if len(ids) != 1:
            raise PermissionDenied("certificate must name exactly one yikatong SPIFFE ID")
        try:
            ident = parse_spiffe_id(ids[0])
        except ValueError as exc:
            raise PermissionDenied("certificate's SPIFFE ID is not a yikatong identity") from exc
        cas = snap.anchors.get(ident.district)
        if not cas:
            raise PermissionDenied(f"district {ident.district} is not trusted by this node")
        for ca in cas:
            try:
                leaf.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            if snap.is_revoked(ca, leaf.serial_number):
                raise PermissionDenied(f"certificate {leaf.serial_number:x} has been revoked")
            return _Verdict(ident, leaf.not_valid_before_utc, leaf.not_valid_after_utc)
        raise PermissionDenied(
            f"certificate names district {ident.district} but was not issued by its CA"
        )


class ServerCertificates:
    """Gives gRPC this node's current certificate and client roots for each new handshake.

    gRPC calls :meth:`fetch` on its own threads per handshake: it only reads
    the store's current snapshot (no I/O) and answers ``None`` when nothing
    changed since it last answered.
    """

    def __init__(self, store: TrustStore) -> None:
        self._store = store
        self._served = store.current.generation

    @staticmethod
    def _configuration(snap: TrustSnapshot) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(snap.key_pem, snap.cert_chain_pem)], root_certificates=snap.client_roots_pem
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        snap = self._store.current
        if snap.generation == self._served:
            return None
        self._served = snap.generation
        return self._configuration(snap)

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that require a client certificate and follow reloads."""
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(self._store.current),
            self.fetch,
            require_client_authentication=True,
        )


_TLS_VERSIONS = {b"TLSv1.2": (1, 2), b"TLSv1.3": (1, 3)}


def check_tls_version(negotiated: list[bytes] | None, minimum: str) -> None:
    """Refuse a call that arrived over a TLS version below ``minimum`` ("1.2" or "1.3")."""
    want = tuple(int(x) for x in minimum.split("."))
    got = _TLS_VERSIONS.get(negotiated[0]) if negotiated else None
    if got is None or got < want:
        shown = negotiated[0].decode() if negotiated else "unknown"
        raise PermissionDenied(f"TLS version {shown} is below the minimum TLS {minimum}")
