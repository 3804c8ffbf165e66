"""Who is calling: identities named by SPIFFE IDs in a certificate's URI SAN.

``spiffe://<district>.yikatong.cy/node`` is a district's node;
``spiffe://<district>.yikatong.cy/operator/<operator_id>`` one of its operators;
``spiffe://<district>.yikatong.cy/admin/<id>`` one of its own back-office staff
(health detail today; the lost-card commands later), never another district's.
The identity of the current call is set by the interceptor (the one place that
reads certificates) and read here by the servicers.
"""

from __future__ import annotations

import enum
import re
from contextvars import ContextVar, Token
from dataclasses import dataclass

from broker.core.errors import Unauthenticated

TRUST_DOMAIN_SUFFIX = "yikatong.cy"
DISTRICT_RE = re.compile(r"[1-8][0-9]{5}")
OPERATOR_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_SPIFFE_RE = re.compile(
    rf"spiffe://(?P<district>{DISTRICT_RE.pattern})\.yikatong\.cy/"
    r"(?:(?P<node>node)|operator/(?P<operator>[a-z0-9][a-z0-9-]{0,62})"
    r"|admin/(?P<admin>[a-z0-9][a-z0-9-]{0,62}))"
)


class Role(enum.StrEnum):
    NODE = "node"
    OPERATOR = "operator"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller: its district, its role and, for operators, its id."""

    district: str
    role: Role
    operator_id: str = ""  # the id of an operator, or of an admin

    @property
    def spiffe_id(self) -> str:
        path = "node" if self.role is Role.NODE else f"{self.role.value}/{self.operator_id}"
        return f"spiffe://{self.district}.{TRUST_DOMAIN_SUFFIX}/{path}"

    @property
    def dns_name(self) -> str:
        """The DNS SAN its certificate carries."""
        if self.role is Role.NODE:
            return f"node.{self.district}.{TRUST_DOMAIN_SUFFIX}"
        return f"{self.operator_id}.{self.role.value}.{self.district}.{TRUST_DOMAIN_SUFFIX}"


def _district(district: str) -> str:
    # It names directories and certificate SANs: nothing but a division code gets through.
    if not DISTRICT_RE.fullmatch(district):
        raise ValueError("district must be a 6-digit administrative division code")
    return district


def node_identity(district: str) -> Identity:
    """A district's node; ``ValueError`` unless ``district`` is a division code."""
    return Identity(_district(district), Role.NODE)


def operator_identity(district: str, operator_id: str) -> Identity:
    """One of a district's operators; ``ValueError`` for a bad district or operator id."""
    _district(district)
    if not OPERATOR_ID_RE.fullmatch(operator_id):
        raise ValueError("operator id must be 1-63 characters of [a-z0-9-], starting alphanumeric")
    return Identity(district, Role.OPERATOR, operator_id)


def admin_identity(district: str, admin_id: str) -> Identity:
    """One of a district's back-office staff; ``ValueError`` for a bad district or id."""
    _district(district)
    if not OPERATOR_ID_RE.fullmatch(admin_id):
        raise ValueError("admin id must be 1-63 characters of [a-z0-9-], starting alphanumeric")
    return Identity(district, Role.ADMIN, admin_id)


def parse_spiffe_id(uri: str) -> Identity:
    """Parse a yikatong SPIFFE ID; raise ``ValueError`` for anything else."""
    m = _SPIFFE_RE.fullmatch(uri)
    if m is None:
        raise ValueError("not a yikatong SPIFFE ID")
    if m.group("node"):
        return Identity(m.group("district"), Role.NODE)
    if m.group("admin"):
        return Identity(m.group("district"), Role.ADMIN, m.group("admin"))
    return Identity(m.group("district"), Role.OPERATOR, m.group("operator"))


_current: ContextVar[Identity | None] = ContextVar("yikatong_identity", default=None)


def current_identity() -> Identity:
    """The identity of the call being handled (set by the interceptor)."""
    ident = _current.get()
    if ident is None:
        raise Unauthenticated("no authenticated identity for this call")
    return ident


def bind_identity(ident: Identity) -> Token[Identity | None]:
    return _current.set(ident)


def unbind_identity(token: Token[Identity | None]) -> None:
    _current.reset(token)
