"""Worker processes in the background of the machine (broker/core/priority.py).

Each case runs in a child process of its own: a process cannot raise its
priority back once it lowered it, and the test runner must stay as it is.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import unavailable


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


def test_keep_to_moves_the_threads_already_running_and_what_starts_after() -> None:
    """A thread's affinity is its own: the running ones are moved one by one."""
    cpu = max(os.sched_getaffinity(0))
    got = run(
        "import os, subprocess, sys, threading\n"
        "from broker.core.priority import keep_to\n"
        "go = threading.Event()\n"
        "seen = {}\n"
        "def early():\n"
        "    go.wait(); seen['early'] = os.sched_getaffinity(0)\n"
        "t = threading.Thread(target=early); t.start()\n"
        f"keep_to([{cpu}])\n"
        "go.set(); t.join()\n"
        "late = threading.Thread(target=lambda: seen.update(late=os.sched_getaffinity(0)))\n"
        "late.start(); late.join()\n"
        "child = subprocess.run([sys.executable, '-c', 'import os; "
        "print(sorted(os.sched_getaffinity(0)))'], capture_output=True, text=True).stdout\n"
        "print(sorted(seen['early']), sorted(seen['late']), child.strip().replace(' ', ''))\n"
    )
    assert got == [f"[{cpu}]"] * 3


def test_to_background_with_cpus_keeps_the_worker_to_them() -> None:
    cpu = min(os.sched_getaffinity(0))
    got = run(
        "import os\n"
        "from broker.core.priority import in_background, to_background\n"
        f"to_background(cpus=[{cpu}])\n"
        "print(sorted(os.sched_getaffinity(0)) == [" + str(cpu) + "], in_background())\n"
    )
    assert got == ["True", "True"]


def test_keep_off_leaves_the_other_cpus_and_refuses_to_leave_none() -> None:
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        unavailable("keeping off a CPU needs 2 this process may use")
    got = run(
        "import os\n"
        "from broker.core.errors import ConfigError\n"
        "from broker.core.priority import keep_off\n"
        "for cpus in ([" + ", ".join(map(str, usable)) + "], [4095]):\n"
        "    try:\n"
        "        keep_off(cpus)\n"
        "    except ConfigError as exc:\n"
        "        print(repr(str(exc)).replace(' ', '_'), len(os.sched_getaffinity(0)))\n"
        f"before = keep_off([{usable[-1]}])\n"
        "print(sorted(before) == " + str(usable) + ", sorted(os.sched_getaffinity(0)))\n"
    )
    assert "leave_at_least_one_to_the_gates" in got[0]
    assert got[2].startswith("'CPU_4095_is_not_one_this_process_may_use")
    assert got[1] == got[3] == str(len(usable))  # a refusal moves nothing
    assert got[4:] == ["True", str(usable[:-1]).replace(" ", "")]


def test_keep_to_a_cpu_the_machine_lacks_is_a_config_error_that_moves_nothing() -> None:
    got = run(
        "import os\n"
        "from broker.core.errors import ConfigError\n"
        "from broker.core.priority import keep_to\n"
        "before = os.sched_getaffinity(0)\n"
        "try:\n"
        "    keep_to([4095])\n"
        "except ConfigError as exc:\n"
        "    named = str(exc).startswith('cannot keep to CPU 4095')\n"
        "    print(named, os.sched_getaffinity(0) == before)\n"
    )
    assert got == ["True", "True"]
