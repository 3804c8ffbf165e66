"""Test hooks at named points: ``YIKATONG_CRASH_AT`` kills the process, ``YIKATONG_PAUSE_AT``
holds it. Test-only: with neither variable set, :func:`point` does nothing.

Every state change of a close is followed by a named point; the crash tests
kill the closing process (SIGKILL, no clean-up) at each one and check that a
restart finishes the day with the same statements as a run without crashes.

The replica tests hold a process at a point instead, to force an interleaving
of two processes without timing: with ``YIKATONG_PAUSE_AT=<point>`` and
``YIKATONG_PAUSE_FILE=<path>``, the first thread to reach the point creates
``<path>.reached`` and every thread reaching it waits there until ``<path>``
exists (the test creates it to let them go on).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ENV = "YIKATONG_CRASH_AT"
PAUSE_ENV = "YIKATONG_PAUSE_AT"
PAUSE_FILE_ENV = "YIKATONG_PAUSE_FILE"


def point(name: str) -> None:
    """Die here, like ``kill -9``, or wait here, when the environment asks for it."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
    release = os.environ.get(PAUSE_FILE_ENV)
    if release and os.environ.get(PAUSE_ENV) == name:
        pause(Path(release))


def pause(release: Path) -> None:
    """Say so in ``<release>.reached``, then wait until ``release`` exists."""
    release.with_name(release.name + ".reached").touch()
    while not release.exists():
        time.sleep(0.01)
