"""Access rights: which identities may call which methods. Deny by default.

Rules map a method (``yikatong.v1.Gate/Check``) or a whole service
(``yikatong.v1.Gate/*``) to the principals that may call it; a method no rule
names is refused to everyone. A principal is one of

- ``peer-nodes``: the nodes of configured peer districts;
- ``own-operators``: this district's operators;
- ``own-node``: this district's own node(s);
- ``any``: any authenticated caller;
- a SPIFFE ID, where ``*`` matches within the last path segment
  (``spiffe://500111.yikatong.cy/operator/bus-*``).

The defaults below apply unless the node config's ``[access]`` table names the
same key (an empty list there shuts a default off).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field

from broker.core.errors import PermissionDenied
from broker.trust.identity import Identity, Role

KEYWORDS = {
    "peer-nodes": "nodes of configured peer districts",
    "own-operators": "this district's operators",
    "own-node": "this district's own node",
    "any": "any authenticated caller",
}

DEFAULT_RULES: Mapping[str, tuple[str, ...]] = {
    "yikatong.v1.Recognition/*": ("peer-nodes",),
    "yikatong.v1.Trust/*": ("peer-nodes", "own-node"),
    "yikatong.v1.Gate/*": ("own-operators",),
    "yikatong.v1.Settlement/SubmitTrips": ("own-operators",),
    "yikatong.v1.Settlement/GetTripOutcomes": ("own-operators",),
    "yikatong.v1.Settlement/GetStatement": ("own-operators",),
    "yikatong.v1.Settlement/PublishFares": ("peer-nodes",),
    "yikatong.v1.Settlement/ExchangeBatch": ("peer-nodes",),
    "yikatong.v1.Settlement/ConfirmDay": ("peer-nodes",),
    "grpc.health.v1.Health/*": ("any",),
    "grpc.reflection.v1alpha.ServerReflection/*": ("any",),
    "grpc.reflection.v1.ServerReflection/*": ("any",),
}


def validate_rules(rules: Mapping[str, object]) -> dict[str, tuple[str, ...]]:
    """Check an ``[access]`` table; raise ``ValueError`` naming the bad key or principal."""
    out: dict[str, tuple[str, ...]] = {}
    for key, principals in rules.items():
        service, _, method = key.partition("/")
        if not service or not method or "." not in service:
            raise ValueError(f"access key {key!r} must look like 'package.Service/Method' or '/*'")
        if not isinstance(principals, list) or not all(isinstance(p, str) for p in principals):
            raise ValueError(f"access.{key} must be a list of principals")
        for p in principals:
            if p not in KEYWORDS and not p.startswith("spiffe://"):
                raise ValueError(f"access.{key}: unknown principal {p!r}")
        out[key] = tuple(principals)
    return out


@dataclass(frozen=True)
class AccessPolicy:
    """The access rules of one node."""

    district: str
    peers: frozenset[str]
    rules: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_RULES))

    def _matches(self, principal: str, ident: Identity) -> bool:
        if principal == "any":
            return True
        if principal == "peer-nodes":
            return ident.role is Role.NODE and ident.district in self.peers
        if principal == "own-operators":
            return ident.role is Role.OPERATOR and ident.district == self.district
        if principal == "own-node":
            return ident.role is Role.NODE and ident.district == self.district
        return fnmatch.fnmatchcase(ident.spiffe_id, principal)

    def authorize(self, method: str, ident: Identity) -> None:
        """Return if ``ident`` may call ``method`` (``/pkg.Service/Method``); else raise."""
        name = method.lstrip("/")
        service, slash, _ = name.rpartition("/")
        principals = self.rules.get(name) if slash else None
        if principals is None and slash:
            principals = self.rules.get(service + "/*")
        if principals is None:
            raise PermissionDenied(f"no access rule grants {name}")
        if any(self._matches(p, ident) for p in principals):
            return
        allowed = ", ".join(KEYWORDS.get(p, p) for p in principals) or "nobody"
        raise PermissionDenied(f"{name} is for {allowed}; {ident.spiffe_id} is not")


def require_operator(ident: Identity, operator_id: str) -> None:
    """An operator may only speak for itself: the request's id must equal its certificate's."""
    if ident.role is not Role.OPERATOR or operator_id != ident.operator_id:
        raise PermissionDenied("operator_id differs from the caller certificate's operator id")
