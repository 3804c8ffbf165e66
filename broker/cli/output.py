"""What every ``broker`` command prints the same way: errors, money, the error console."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

from rich.console import Console
from rich.markup import escape

from broker.core.errors import BrokerError

err = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` to stderr and exit with ``code``."""
    # The message is text, not markup: "[ledger] is not configured" must print as written.
    err.print(f"[red]error:[/red] {escape(message)}", emoji=False)
    sys.exit(code)


@contextmanager
def broker_errors() -> Iterator[None]:
    """Turn a :class:`BrokerError` raised inside into :func:`fail` with its message."""
    try:
        yield
    except BrokerError as exc:
        fail(str(exc))


def yuan(fen: int) -> str:
    """Integer fen shown as yuan, without ever passing through a float."""
    return f"{'-' if fen < 0 else ''}{abs(fen) // 100}.{abs(fen) % 100:02d}"
