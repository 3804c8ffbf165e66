"""Checks of the short identifiers requests carry: request, gate and place ids.

Gate and place ids come from this district's own operators and are refused
when malformed. A ``request_id`` comes from another district's client: it is
never refused (their client keeps working) and never echoed (a peer must not
be able to plant text, an ID number say, in our logs). Anything but a W3C
trace-id is replaced by one generated here, see :func:`trace_id_or_new`.
"""

from __future__ import annotations

import re
import secrets

from broker.core.errors import InvalidArgument

MAX_ID = 64
TRACE_ID_LEN = 32
INVALID_TRACE_ID = "0" * TRACE_ID_LEN  # W3C Trace Context: all zeros is not a trace-id
_TRACE_ID = re.compile(r"[0-9a-f]{32}")


def short_id(value: str, field: str, required: bool) -> str:
    """``value`` if it is 1-64 printable characters (or empty when not ``required``), else raise."""
    if (required and not value) or len(value) > MAX_ID or not value.isprintable():
        raise InvalidArgument(field, f"must be 1-{MAX_ID} printable characters")
    return value


def is_trace_id(value: str) -> bool:
    """Whether ``value`` is a W3C trace-id: 32 lower-case hex digits, not all zeros."""
    return _TRACE_ID.fullmatch(value) is not None and value != INVALID_TRACE_ID


def new_trace_id() -> str:
    """A random W3C trace-id (128 bits, never the all-zero one)."""
    while True:
        value = secrets.token_hex(TRACE_ID_LEN // 2)
        if value != INVALID_TRACE_ID:
            return value


def trace_id_or_new(value: str) -> tuple[str, str | None]:
    """``(value, None)`` if ``value`` is a trace-id, else ``(a new one, why it was replaced)``.

    The reason is ``"empty"``, ``"oversized"`` (longer than a trace-id) or
    ``"malformed"``; it says nothing of the value itself, which is dropped.
    """
    if is_trace_id(value):
        return value, None
    if not value:
        reason = "empty"
    elif len(value) > TRACE_ID_LEN:
        reason = "oversized"
    else:
        reason = "malformed"
    return new_trace_id(), reason
