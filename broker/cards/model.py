"""Card references, ID-number validation and entitlements: the card domain.

Pure functions over plain values; nothing here touches the network, a
database or gRPC.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from broker.core.errors import InvalidArgument

SHANGHAI = ZoneInfo("Asia/Shanghai")

_REGION_RE = re.compile(r"[1-8][0-9]{5}")
_CARD_RE = re.compile(r"[0-9A-Z]{6,20}")


class CardStatus(enum.IntEnum):
    """Status of a card; values equal the wire enum ``yikatong.v1.CardStatus``."""

    ACTIVE = 1
    LOST = 2
    SUSPENDED = 3
    EXPIRED = 4
    UNKNOWN = 5


class Entitlement(enum.IntEnum):
    """Concession entitlement; values equal the wire enum ``yikatong.v1.Entitlement``."""

    SENIOR_60 = 1
    SENIOR_65 = 2
    SENIOR_70 = 3
    DISABLED = 4
    STUDENT = 5


class Scene(enum.IntEnum):
    """Where a card is presented; values equal the wire enum ``yikatong.v1.Scene``."""

    UNSPECIFIED = 0
    BUS = 1
    SCENIC_AREA = 2
    MUSEUM = 3
    LIBRARY = 4


class DecisionSource(enum.IntEnum):
    """Where a gate's decision came from; values equal the wire enum
    ``yikatong.v1.DecisionSource``. Here, not in ``gate``: settlement reads it from trips."""

    HOME = 1
    CACHE = 2
    PEER = 3
    STALE = 4
    OFFLINE_POLICY = 5


@dataclass(frozen=True, slots=True)
class CardRef:
    """A card as read from its chip: issuing region and card number."""

    issuer_region: str
    card_number: str

    def __repr__(self) -> str:
        # Card numbers never reach logs, even through a repr.
        return f"CardRef(issuer_region={self.issuer_region!r}, card_number=<redacted>)"


@dataclass(frozen=True, slots=True)
class LogPosition:
    """A position in a home district's status log (:mod:`broker.cards.status_log`): after
    the change numbered ``seq`` (0: before the first), whose random mark is ``mark``, in the
    log's history ``epoch``. Positions of one epoch compare by ``seq``."""

    epoch: str
    seq: int
    mark: str


@dataclass(frozen=True, slots=True)
class Recognition:
    """What a home district says about one of its cards.

    Attributes:
        status: the card's status now.
        entitlements: every entitlement that applies (empty unless ACTIVE).
        ttl_seconds: how long other districts may cache this answer.
        position: where the home's status log stood when the answer was read
            (``None`` from a home that does not push changes).
        max_stale_seconds: how long past ``ttl_seconds`` the home still honours it
            (served ``STALE`` when the home cannot be asked).
    """

    status: CardStatus
    entitlements: tuple[Entitlement, ...]
    ttl_seconds: int
    position: LogPosition | None = None
    max_stale_seconds: int = 0


def validate_region(code: str, field: str = "card.issuer_region") -> str:
    """Return ``code`` if it is a well-formed 6-digit division code, else raise."""
    if not _REGION_RE.fullmatch(code):
        raise InvalidArgument(field, "must be a 6-digit administrative division code")
    return code


def validate_card_number(number: str, field: str = "card.card_number") -> str:
    """Return ``number`` if it is 6-20 characters of [0-9A-Z], else raise."""
    if not _CARD_RE.fullmatch(number):
        raise InvalidArgument(field, "must be 6-20 characters of [0-9A-Z]")
    return number


def card_ref(issuer_region: str, card_number: str, prefix: str = "card") -> CardRef:
    """Build a validated :class:`CardRef`; errors name ``<prefix>.<field>``."""
    return CardRef(
        validate_region(issuer_region, f"{prefix}.issuer_region"),
        validate_card_number(card_number, f"{prefix}.card_number"),
    )


def shanghai_day(now: datetime) -> date:
    """The calendar day in Asia/Shanghai of a timezone-aware instant."""
    if now.tzinfo is None:
        raise ValueError("naive datetime: every instant must be timezone-aware")
    return now.astimezone(SHANGHAI).date()


def seconds_to_shanghai_midnight(now: datetime) -> int:
    """Whole seconds, rounded down, from ``now`` to the next midnight in Asia/Shanghai: how
    long an answer of today may be kept, since validity and age thresholds turn over then."""
    day = shanghai_day(now)
    midnight = datetime.combine(day + timedelta(days=1), time(0), SHANGHAI)
    return int((midnight - now).total_seconds())
