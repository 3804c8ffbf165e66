"""Crash injection for tests: ``YIKATONG_CRASH_AT=<point>`` kills the process at that point.

Every state change of a close is followed by a named point; the crash tests
kill the closing process (SIGKILL, no clean-up) at each one and check that a
restart finishes the day with the same statements as a run without crashes.
"""

from __future__ import annotations

import os
import signal

ENV = "YIKATONG_CRASH_AT"


def point(name: str) -> None:
    """Die here, like ``kill -9``, when the environment asks for it."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
