"""Crash injection (broker.settlement.clearing.crash): a named point kills only when asked to.

The killing case runs in a child ``python -c`` so that the test process survives it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

VAR = "YIKATONG_CRASH_AT"  # the documented name the crash tests and operators set
SCRIPT = (
    "from broker.settlement.clearing import crash\n"
    "print('before', flush=True)\n"
    "crash.point('batch_sent')\n"
    "print('after', flush=True)\n"
)


def run_child(env_value: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != VAR}
    if env_value is not None:
        env[VAR] = env_value
    return subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=30
    )


def test_the_named_point_kills_the_process_with_sigkill():
    child = run_child("batch_sent")
    assert child.returncode == -signal.SIGKILL == -9
    assert child.stdout == "before\n"  # died at the point: nothing after it ran
    assert child.stderr == ""  # no traceback, no clean-up: like kill -9


@pytest.mark.parametrize("named", [None, "ack_stored", "", "BATCH_SENT", "batch_sent "])
def test_a_child_with_no_point_or_another_point_named_runs_to_the_end(named):
    """Names must match exactly; run in a child so that a regression cannot kill pytest."""
    child = run_child(named)
    assert child.returncode == 0, child.stderr
    assert child.stdout == "before\nafter\n"
