"""Checks of the short free-text identifiers requests carry (request, gate and place ids)."""

from __future__ import annotations

from broker.core.errors import InvalidArgument

MAX_ID = 64


def short_id(value: str, field: str, required: bool) -> str:
    """``value`` if it is 1-64 printable characters (or empty when not ``required``), else raise."""
    if (required and not value) or len(value) > MAX_ID or not value.isprintable():
        raise InvalidArgument(field, f"must be 1-{MAX_ID} printable characters")
    return value
