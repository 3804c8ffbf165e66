"""Logging setup: structlog to stderr, console text or JSON lines, in every process.

:func:`configure` is what the CLI calls (see :mod:`broker.node.logs` for why
gRPC core is silenced); it also leaves its choice in the environment, so that
the worker processes a node spawns (trip intake, home verification) call
:func:`configure_from_env` and log the same way, to stderr — never to
stdout, which carries the commands' own output (``demo --json``).
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

LEVEL_ENV = "YIKATONG_LOG_LEVEL"
JSON_ENV = "YIKATONG_LOG_JSON"


def configure_from_env() -> None:
    """In a spawned worker process: log as the process that spawned it chose."""
    configure(os.environ.get(LEVEL_ENV, "info"), os.environ.get(JSON_ENV) == "1")


def configure(level: str = "info", json: bool = False) -> None:
    """Configure structlog, and route the standard library's logging through it.

    Events below ``level`` are dropped before formatting; records of the standard
    library's logging below ``info`` are dropped whatever the level. Unknown level
    names raise :class:`KeyError`. The choice is left in the environment for the
    worker processes spawned after it (:func:`configure_from_env`).
    """
    os.environ[LEVEL_ENV], os.environ[JSON_ENV] = level, "1" if json else "0"
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    min_level = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(min_level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,  # so tests can capture after any configure()
    )
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, StdlibToStructlog)]:
        root.removeHandler(handler)
    root.addHandler(StdlibToStructlog())
    # Libraries' debug records (grpc announces its event loop on every call) are their
    # chatter, not the broker's: ``debug`` is for the broker's own events.
    root.setLevel(max(min_level, logging.INFO))


class StdlibToStructlog(logging.Handler):
    """Hands each standard-library log record to structlog, so it is rendered the same way.

    Without it, a record from asyncio reaches stderr as plain text through
    :data:`logging.lastResort`, tracebacks spread over many lines.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string in someone's log call must not kill the caller
            self.handleError(record)
            return
        fields: dict[str, object] = {"logger": record.name}
        if record.exc_info:
            fields["exc_info"] = record.exc_info
        # structlog knows the five standard levels only; custom ones round down.
        level = min(max(record.levelno // 10 * 10, logging.DEBUG), logging.CRITICAL)
        structlog.get_logger().log(level, message, **fields)
