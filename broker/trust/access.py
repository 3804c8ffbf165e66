"""Access rights: which identities may call which methods. Deny by default.

Rules map a method (``yikatong.v1.Gate/Check``) or a whole service
(``yikatong.v1.Gate/*``) to the principals that may call it; a method no rule
names is refused to everyone. A principal is one of

- ``peer-nodes``: the nodes of configured peer districts;
- ``own-operators``: this district's operators;
- ``own-node``: this district's own node(s);
- ``own-admins``: this district's back-office staff (``…/admin/<id>``);
- ``any``: any authenticated caller;
- a SPIFFE ID pattern, where ``*`` matches within one segment: within one
  label of the trust domain (``spiffe://*.yikatong.cy/...`` never crosses a
  ``.``) or within one segment of the path (``.../operator/bus-*`` matches
  ``bus-01`` and ``bus-1-2``, never ``bus-01/x``). Nothing else is special:
  ``**``, ``?`` and ``[...]`` are refused when the rules are loaded.

The defaults below apply unless the node config's ``[access]`` table names the
same key (an empty list there shuts a default off).

The methods in :data:`OPERATOR_METHODS` act for the operator who calls them
(its trips, its statement, its gates). Whatever the rules say, only this
district's operators may call them: a rule can narrow that, never widen it, so
``"any"`` or ``spiffe://*.yikatong.cy/operator/bus-01`` never lets another
district's ``bus-01`` act as ours.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Container, Mapping
from dataclasses import dataclass, field

from broker.core.errors import InvalidArgument, PermissionDenied
from broker.trust.identity import Identity, Role

KEYWORDS = {
    "peer-nodes": "nodes of configured peer districts",
    "own-operators": "this district's operators",
    "own-node": "this district's own node",
    "own-admins": "this district's back-office staff (spiffe://<code>.yikatong.cy/admin/<id>)",
    "any": "any authenticated caller",
}

OPERATOR_METHODS: frozenset[str] = frozenset(
    {
        "yikatong.v1.Gate/*",
        "yikatong.v1.Settlement/SubmitTrips",
        "yikatong.v1.Settlement/GetTripOutcomes",
        "yikatong.v1.Settlement/GetStatement",
    }
)

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
    "yikatong.v1.CardAdmin/*": ("own-admins",),
    "grpc.health.v1.Health/*": ("any",),
    "grpc.reflection.v1alpha.ServerReflection/*": ("any",),
    "grpc.reflection.v1.ServerReflection/*": ("any",),
}

# What a pattern may be made of: SPIFFE's own characters plus ``*``. Anything
# else (``?``, ``[``, ``\``) would look like a glob and silently match nothing.
_PATTERN_SHAPE = re.compile(r"spiffe://(?P<host>[a-z0-9._*-]+)(?P<path>(?:/[A-Za-z0-9._*-]+)+)")
_HOST_STAR = r"[^./]*"  # within one label of the trust domain
_PATH_STAR = r"[^/]*"  # within one segment of the path


def _translate(part: str, star: str) -> str:
    """``part`` as a regular expression: every character literal but ``*``, which is ``star``."""
    return star.join(re.escape(chunk) for chunk in part.split("*"))


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """The regular expression of a SPIFFE ID pattern; ``ValueError`` says what is wrong with it."""
    if "**" in pattern:
        raise ValueError("'**' is not a pattern here: '*' matches within one segment")
    shape = _PATTERN_SHAPE.fullmatch(pattern)
    if shape is None:
        raise ValueError(
            "a SPIFFE ID pattern is spiffe://<trust domain>/<path> of letters, digits,"
            " '.', '-', '_' and '*' ('?' and '[' are not patterns here)"
        )
    if any(seg in (".", "..") for seg in shape["path"].split("/")):
        raise ValueError("a SPIFFE ID path has no '.' or '..' segments")
    host = _translate(shape["host"], _HOST_STAR)
    path = _translate(shape["path"], _PATH_STAR)
    return re.compile(f"spiffe://{host}{path}")


def _check_principal(key: str, principal: str) -> None:
    if principal in KEYWORDS:
        return
    if not principal.startswith("spiffe://"):
        raise ValueError(f"access.{key}: unknown principal {principal!r}")
    try:
        compile_pattern(principal)
    except ValueError as exc:
        raise ValueError(f"access.{key}: principal {principal!r}: {exc}") from exc


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
            _check_principal(key, p)
        out[key] = tuple(principals)
    return out


def _governing_key(keys: Container[str], name: str) -> str | None:
    """The key of ``keys`` that speaks for method ``name`` (``pkg.Service/Method``), if any.

    The method's own key wins over its service's ``/*``.
    """
    service, slash, _ = name.rpartition("/")
    if not slash:
        return None
    for key in (name, service + "/*"):
        if key in keys:
            return key
    return None


@dataclass(frozen=True)
class AccessPolicy:
    """The access rules of one node.

    Raises ``ValueError`` at construction if a rule names a malformed SPIFFE ID
    pattern (the config loader refuses those earlier, naming the key).
    """

    district: str
    peers: frozenset[str]
    rules: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_RULES))

    def __post_init__(self) -> None:
        validate_rules({key: list(principals) for key, principals in self.rules.items()})

    def _matches(self, principal: str, ident: Identity) -> bool:
        if principal == "any":
            return True
        if principal == "peer-nodes":
            return ident.role is Role.NODE and ident.district in self.peers
        if principal == "own-operators":
            return ident.role is Role.OPERATOR and ident.district == self.district
        if principal == "own-node":
            return ident.role is Role.NODE and ident.district == self.district
        if principal == "own-admins":
            return ident.role is Role.ADMIN and ident.district == self.district
        return compile_pattern(principal).fullmatch(ident.spiffe_id) is not None

    def _bind_operator(self, name: str, ident: Identity) -> None:
        """Refuse anyone but this district's operators a method that acts for an operator."""
        if ident.district != self.district:
            raise PermissionDenied(
                f"{ident.role} of district {ident.district} may not call {name}"
                f" on district {self.district}'s node ({ident.spiffe_id})"
            )
        if ident.role is not Role.OPERATOR:
            raise PermissionDenied(f"{name} acts for an operator; {ident.spiffe_id} is not one")

    def authorize(self, method: str, ident: Identity) -> None:
        """Return if ``ident`` may call ``method`` (``/pkg.Service/Method``); else raise."""
        name = method.lstrip("/")
        if _governing_key(OPERATOR_METHODS, name) is not None:
            self._bind_operator(name, ident)
        key = _governing_key(self.rules, name)
        if key is None:
            raise PermissionDenied(f"no access rule grants {name}")
        principals = self.rules[key]
        if any(self._matches(p, ident) for p in principals):
            return
        allowed = ", ".join(KEYWORDS.get(p, p) for p in principals) or "nobody"
        raise PermissionDenied(f"{name} is for {allowed}; {ident.spiffe_id} is not")


def is_operator_method(method: str) -> bool:
    """Whether ``method`` (``/pkg.Service/Method``) acts for the operator calling it."""
    return _governing_key(OPERATOR_METHODS, method.lstrip("/")) is not None


def require_operator(ident: Identity, operator_id: str) -> None:
    """An operator may only speak for itself: the request's id must equal its certificate's."""
    if not operator_id:
        raise InvalidArgument("operator_id", "is required")
    if ident.role is not Role.OPERATOR or operator_id != ident.operator_id:
        raise PermissionDenied("operator_id differs from the caller certificate's operator id")
