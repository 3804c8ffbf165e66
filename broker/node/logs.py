"""Logging setup: structlog to stderr, console text or JSON lines. Called by the CLI.

With ``--log-json`` every line the node writes to stderr is one JSON object, so a
log shipper can parse the stream line by line. Three writers share that stream:

* structlog, configured by :func:`configure`;
* the standard library's :mod:`logging` (asyncio, grpc's Python layer):
  :func:`configure` hands its records to structlog, which renders them like any
  other event (``logger`` names the source);
* gRPC core (C++), which writes lines such as ``I1129 … ssl_transport_security.cc:2563]
  Handshake failed …`` straight to file descriptor 2, with no Python hook. A peer
  controls when they appear: any garbage sent to the port produces one.

For gRPC core there were two ways out: (a) send the JSON lines to stdout and leave
stderr to core, or (b) silence core with ``GRPC_VERBOSITY``. We chose (b):
``GRPC_VERBOSITY`` defaults to ``NONE``. Core reads the variable once, when grpc is
first imported, so both entries of the ``broker`` command set it before they import
anything else: ``broker/__main__.py`` (``python -m broker``) and the top of
``broker/cli/main.py`` (the ``broker`` console script, ``broker.cli.main:main``).
We did not choose (a) because:

* stdout carries the commands' own output (``demo --json``, ``trust status``,
  settlement reports), which log lines must not corrupt;
* under systemd both descriptors go to the same journal, so moving the JSON lines
  to stdout would not keep core's lines off the stream that is collected.

Nothing the operator needs is lost: a handshake that fails never reaches the node's
code, and the client sees ``UNAVAILABLE``; what core reports about the node's own
calls reaches Python as a status code. To debug TLS, set ``GRPC_VERBOSITY=INFO``
(and ``GRPC_TRACE``) in the environment: a value set there is kept, and its lines
are core's own text, not JSON.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure(level: str = "info", json: bool = False) -> None:
    """Configure structlog, and route the standard library's logging through it.

    Events below ``level`` are dropped before formatting; records of the standard
    library's logging below ``info`` are dropped whatever the level. Unknown level
    names raise :class:`KeyError`.
    """
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
