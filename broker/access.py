"""Access rights: which identities may call which methods. Deny by default.

- ``yikatong.v1.Recognition/*``: nodes of configured peer districts only;
- ``yikatong.v1.Gate/*``: operators of this node's own district only;
- health and reflection: any authenticated caller;
- anything else: nobody.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.errors import PermissionDenied
from broker.identity import Identity, Role

RECOGNITION = "/yikatong.v1.Recognition/"
GATE = "/yikatong.v1.Gate/"
OPEN_TO_ANY_CALLER = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


@dataclass(frozen=True)
class AccessPolicy:
    """The access rules of one node."""

    district: str
    peers: frozenset[str]

    def authorize(self, method: str, ident: Identity) -> None:
        """Return if ``ident`` may call ``method``; else raise :class:`PermissionDenied`."""
        if method.startswith(RECOGNITION):
            if ident.role is not Role.NODE:
                raise PermissionDenied("Recognition is for peer district nodes only")
            if ident.district not in self.peers:
                raise PermissionDenied(f"district {ident.district} is not a configured peer")
            return
        if method.startswith(GATE):
            if ident.role is not Role.OPERATOR:
                raise PermissionDenied("Gate is for this district's operators only")
            if ident.district != self.district:
                raise PermissionDenied(
                    f"operators of district {ident.district} may not use this node"
                )
            return
        if method.startswith(OPEN_TO_ANY_CALLER):
            return
        raise PermissionDenied("no access rule grants this method")


def require_operator(ident: Identity, operator_id: str) -> None:
    """An operator may only speak for itself: the request's id must equal its certificate's."""
    if ident.role is not Role.OPERATOR or operator_id != ident.operator_id:
        raise PermissionDenied("operator_id differs from the caller certificate's operator id")
