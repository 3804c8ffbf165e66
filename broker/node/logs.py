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

from broker.core.logs import StdlibToStructlog, configure, configure_from_env

__all__ = ["StdlibToStructlog", "configure", "configure_from_env"]
