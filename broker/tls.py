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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from broker.config import NodeConfig, TLSConfig
from broker.errors import ConfigError, PermissionDenied, Unauthenticated
from broker.identity import Identity, parse_spiffe_id


def read_pem(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"TLS file {path} does not exist") from exc


def load_certificates(path: Path) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(read_pem(path))
    except ValueError as exc:
        raise ConfigError(f"{path} holds no PEM certificate") from exc
    return certs


def trust_anchors(cfg: NodeConfig) -> dict[str, list[x509.Certificate]]:
    """District code → the CA certificates trusted for it (own district and peers)."""
    anchors = {cfg.district: load_certificates(cfg.tls.ca_file)}
    for peer in cfg.peers:
        anchors[peer.district] = load_certificates(peer.ca_file)
    return anchors


def pem_bundle(anchors: Mapping[str, Sequence[x509.Certificate]]) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return b"".join(c.public_bytes(Encoding.PEM) for cas in anchors.values() for c in cas)


def server_credentials(tls: TLSConfig, client_roots: bytes) -> grpc.ServerCredentials:
    """Server credentials that require a client certificate chaining to ``client_roots``."""
    return grpc.ssl_server_credentials(
        [(read_pem(tls.key_file), read_pem(tls.cert_file))],
        root_certificates=client_roots,
        require_client_auth=True,
    )


def channel_credentials(roots: bytes, tls: TLSConfig) -> grpc.ChannelCredentials:
    """Client credentials presenting this node's (or operator's) certificate."""
    return grpc.ssl_channel_credentials(
        root_certificates=roots,
        private_key=read_pem(tls.key_file),
        certificate_chain=read_pem(tls.cert_file),
    )


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
    """Turns a caller's leaf certificate (PEM) into an :class:`Identity`, or refuses it."""

    def __init__(self, anchors: Mapping[str, Sequence[x509.Certificate]], max_cached: int = 4096):
        self._anchors = {k: tuple(v) for k, v in anchors.items()}
        self._cache: OrderedDict[bytes, _Verdict] = OrderedDict()
        self._max = max_cached

    def identify(self, leaf_pem: bytes, now: datetime) -> Identity:
        verdict = self._cache.get(leaf_pem)
        if verdict is None:
            verdict = self._verify(leaf_pem)
            self._cache[leaf_pem] = verdict
            if len(self._cache) > self._max:
                self._cache.popitem(last=False)
        if not verdict.not_before <= now <= verdict.not_after:
            raise Unauthenticated("certificate is outside its validity period")
        return verdict.identity

    def _verify(self, leaf_pem: bytes) -> _Verdict:
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
        cas = self._anchors.get(ident.district)
        if not cas:
            raise PermissionDenied(f"district {ident.district} is not trusted by this node")
        for ca in cas:
            try:
                leaf.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return _Verdict(ident, leaf.not_valid_before_utc, leaf.not_valid_after_utc)
        raise PermissionDenied(
            f"certificate names district {ident.district} but was not issued by its CA"
        )
