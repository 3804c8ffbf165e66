"""Worker processes in the background of the machine (broker/core/priority.py).

Each case runs in a child process of its own: a process cannot raise its
priority back once it lowered it, and the test runner must stay as it is.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run(code: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    return done.stdout.split()


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_a_worker_moves_itself_to_sched_idle_and_its_threads_follow() -> None:
    got = run(
        "import os, threading\n"
        "from broker.core.priority import in_background, to_background\n"
        "print(to_background())\n"
        "seen = []\n"
        "t = threading.Thread(target=lambda: seen.append(os.sched_getscheduler(0)))\n"
        "t.start(); t.join()\n"
        "print(os.sched_getscheduler(0) == os.SCHED_IDLE, seen == [os.SCHED_IDLE])\n"
        "print(in_background())\n"
    )
    assert got == ["idle", "True", "True", "True"]


def test_without_sched_idle_the_worker_is_niced_instead() -> None:
    got = run(
        "import os\n"
        "if hasattr(os, 'SCHED_IDLE'):\n"
        "    del os.SCHED_IDLE\n"
        "from broker.core.priority import in_background, to_background\n"
        "before = os.getpriority(os.PRIO_PROCESS, 0)\n"
        "print(to_background(7), os.getpriority(os.PRIO_PROCESS, 0) - before, in_background())\n"
    )
    assert got == ["nice", "7", "True"]
