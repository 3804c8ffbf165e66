"""Putting a worker process in the background of the machine, behind the gates.

A niced process still holds a core for its whole time slice when a gate's
thread wakes up: on Linux's EEVDF scheduler (6.6 and later) a woken task of
normal priority does not preempt a niced one at once, it waits for the slice
to end, which measured as milliseconds of gate-check p99 on a 2-core node
while trips were ingested (scripts/bench-gate-load). A ``SCHED_IDLE`` process
is preempted as soon as any normal task wakes, and a core that runs only such
processes counts as idle when a woken task picks one; otherwise it still gets
the CPU that nothing else wants.

Worker processes (trip intake, home verification) call :func:`to_background`
once, at their start. Where ``SCHED_IDLE`` is not available (not Linux) they
are niced instead.
"""

from __future__ import annotations

import os
from typing import Literal

DEFAULT_NICE = 10

Priority = Literal["idle", "nice"]


def to_background(nice: int = DEFAULT_NICE) -> Priority:
    """Move the calling process (every thread it starts afterwards too) behind normal work.

    ``SCHED_IDLE`` where the OS has it, else niced by ``nice``. Returns which
    it got. Any process may lower its own priority so: this needs no privilege.
    """
    idle = getattr(os, "SCHED_IDLE", None)
    if idle is not None:
        try:
            os.sched_setscheduler(0, idle, os.sched_param(0))
        except OSError:  # a sandbox that forbids it: niced is the next best thing
            pass
        else:
            return "idle"
    os.nice(nice)
    return "nice"


def in_background(pid: int = 0) -> bool:
    """Whether process ``pid`` (0: this one) runs behind normal work (``SCHED_IDLE``, or niced)."""
    idle = getattr(os, "SCHED_IDLE", None)
    if idle is not None and os.sched_getscheduler(pid) == idle:
        return True
    return os.getpriority(os.PRIO_PROCESS, pid) > 0
