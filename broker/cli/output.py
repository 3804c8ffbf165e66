"""What every ``broker`` command prints the same way: errors, money, the consoles.

Operators copy what the commands print: a CA fingerprint read out by phone, a
serial passed to ``revoke --serial``, a path, a line fed to ``grep``. Rich's
defaults suit prose, not these: ``:CD:`` or ``:AB:`` inside a fingerprint
becomes an emoji (``96:CD:22`` → ``96💿22``, about one CA in five),
``[ledger]`` is read as markup, numbers are recoloured, and a long line is
wrapped at 80 columns when the output is piped. Every console here is
therefore :func:`plain_console`; plain values go out with ``click.echo``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

from rich.console import Console
from rich.text import Text

from broker.core.errors import BrokerError


def plain_console(stderr: bool = False, width: int | None = None) -> Console:
    """A console that prints text exactly as given: no markup, emoji, highlighting or wrapping.

    A printed line is never wrapped, whatever the terminal or ``COLUMNS`` says;
    a table still fits ``width`` (default: the terminal's), wrapping inside its
    cells unless a column says ``no_wrap``.
    """
    return Console(
        stderr=stderr,
        width=width,
        emoji=False,
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


err = plain_console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` to stderr, on one line and verbatim, and exit with ``code``."""
    err.print(Text.assemble(("error:", "red"), " ", message))
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
