"""Test hooks (broker.settlement.clearing.crash): a named point kills, or pauses, only when asked.

The killing case runs in a child ``python -c`` so that the test process survives it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

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


def test_a_paused_point_says_it_was_reached_and_waits_for_its_release_file(tmp_path):
    release = tmp_path / "go"
    env = {k: v for k, v in os.environ.items() if k != VAR}
    env.update(YIKATONG_PAUSE_AT="batch_sent", YIKATONG_PAUSE_FILE=str(release))
    child = subprocess.Popen(
        [sys.executable, "-c", SCRIPT], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "before\n"
        reached = tmp_path / "go.reached"
        deadline = time.monotonic() + 20
        while not reached.exists():  # the child says it is at the point
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.01)
        assert child.poll() is None  # and waits there
        release.touch()
        assert child.wait(timeout=20) == 0
        assert child.stdout.read() == "after\n"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()


@pytest.mark.parametrize("named", ["ack_stored", "", "BATCH_SENT"])
def test_a_pause_at_another_point_or_without_its_file_does_not_wait(tmp_path, named):
    for with_file in (True, False):
        env = {k: v for k, v in os.environ.items() if k != VAR}
        env["YIKATONG_PAUSE_AT"] = named if with_file else "batch_sent"
        if with_file:
            env["YIKATONG_PAUSE_FILE"] = str(tmp_path / "never")
        child = subprocess.run(
            [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=30
        )
        assert (child.returncode, child.stdout) == (0, "before\nafter\n"), child.stderr
        assert not (tmp_path / "never.reached").exists()
