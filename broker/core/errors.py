"""Every error the broker raises on purpose, under one root.

The tree::

    BrokerError
    ├── InvalidArgument        a request or input field is malformed (names the field)
    ├── PermissionDenied       the authenticated caller may not do this
    ├── Unauthenticated        the caller presented no usable identity
    ├── PeerUnavailable        a peer district did not answer in time, or failed
    ├── ConfigError            the node configuration is incomplete or inconsistent
    ├── ImportRejected         a registry import file was refused whole (carries every bad row)
    ├── DocumentRefused        a signed settlement document or batch fails its signature or digest
    ├── Conflict               other content under an identifier already used (a batch sequence)
    ├── LimitExceeded          an input is larger than a configured maximum (names the setting)
    ├── SettlementStateError   a settlement step asked for in the wrong state
    ├── Busy                   too much work queued already: retry later (with a hint)
    └── Unavailable            a part of this node (a worker process, storage) is down: retry

Errors from foreign libraries (grpc, redis, sqlite3) are converted at the edge
that calls them, with ``raise ... from exc``. The mapping from these errors to
gRPC status codes lives in exactly one place: ``broker.node.guard``.
"""

from __future__ import annotations

from dataclasses import dataclass


class BrokerError(Exception):
    """Root of every error the broker raises on purpose."""


class InvalidArgument(BrokerError):
    """A field of a request or an input file is malformed.

    Attributes:
        field: dotted path of the offending field, e.g. ``card.card_number``.
        reason: what is wrong with it, in plain words, never echoing a card
            number or an ID number.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class PermissionDenied(BrokerError):
    """The caller is authenticated but may not call this, or may not act as it claims."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unauthenticated(BrokerError):
    """The caller presented no certificate, or one we cannot read."""


class PeerUnavailable(BrokerError):
    """A peer district's node did not answer within the deadline, or answered with an error.

    Attributes:
        district: the peer's district code.
    """

    def __init__(self, district: str, reason: str) -> None:
        super().__init__(f"district {district}: {reason}")
        self.district = district
        self.reason = reason


class ConfigError(BrokerError):
    """The node configuration is missing something or contradicts itself."""


@dataclass(frozen=True)
class RowError:
    """One bad row of an import file: its line number and why it was refused."""

    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


class ImportRejected(BrokerError):
    """A registry import file was refused whole; nothing was written.

    Attributes:
        errors: every bad row, in file order.
    """

    def __init__(self, errors: list[RowError]) -> None:
        super().__init__(f"{len(errors)} bad row(s); nothing imported")
        self.errors = errors


class DocumentRefused(BrokerError):
    """A signed settlement document, batch or acknowledgement that must not be acted on.

    Nothing of it is stored; the reason says which check failed (signature,
    unknown key, digest, totals) without echoing any card number.
    """


class Conflict(BrokerError):
    """An identifier already used with other content (e.g. a batch sequence number)."""


class LimitExceeded(BrokerError):
    """An input is larger than a configured maximum; sent again unchanged, it is refused again.

    Attributes:
        setting: the configuration key of the maximum, e.g. ``settlement.max_batch_lines``.
        maximum: its value.
    """

    def __init__(self, setting: str, maximum: int, what: str) -> None:
        super().__init__(f"more than {maximum} {what} (the limit {setting})")
        self.setting = setting
        self.maximum = maximum


class SettlementStateError(BrokerError):
    """A settlement step asked for when its preconditions do not hold."""


class Busy(BrokerError):
    """Too much work is queued already; the same request later will be served.

    Attributes:
        retry_after_s: a hint for the caller, in seconds.
    """

    def __init__(self, what: str, retry_after_s: float) -> None:
        super().__init__(f"{what}; retry in {retry_after_s:g} s")
        self.retry_after_s = retry_after_s


class Unavailable(BrokerError):
    """A part of this node (a worker process, its storage) stopped or cannot be reached now.

    Nothing the caller was told was done is lost; the same request later may be served.
    """
