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

Priority alone still cost the gates 3-5x their idle p99 at concurrency 1 while
10,000-trip requests were uploaded (scripts/bench-gate-load, 2 cores): the
kernel's work on a worker's behalf (a 1 MB TLS request's socket reads and
writes, its pages) runs on whichever core the worker is on, and no scheduling
class preempts it. Placement removes that: with ``settlement.worker_cpus`` the
workers keep to their own CPUs (:func:`to_background`'s ``cpus``) and the
node's process, which answers gates, keeps off them (:func:`keep_off`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection
from pathlib import Path
from typing import Literal

from broker.core.errors import ConfigError

DEFAULT_NICE = 10

Priority = Literal["idle", "nice"]


def to_background(nice: int = DEFAULT_NICE, cpus: Collection[int] = ()) -> Priority:
    """Move the calling process (every thread it starts afterwards too) behind normal work.

    ``SCHED_IDLE`` where the OS has it, else niced by ``nice``; and, when
    ``cpus`` is given, onto those CPUs only (:func:`keep_to`). Returns which
    priority it got. Any process may lower its own priority so: this needs no
    privilege. The priority is the calling thread's (Linux's is per thread):
    call it first thing, before the process starts threads of its own.
    """
    if cpus:
        keep_to(cpus)
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


def usable_cpus() -> frozenset[int]:
    """The CPUs this process may run on (its affinity: a cgroup or ``taskset`` may narrow it)."""
    if not hasattr(os, "sched_getaffinity"):
        raise ConfigError("CPU placement needs Linux (sched_setaffinity)")
    return frozenset(os.sched_getaffinity(0))


def keep_to(cpus: Collection[int]) -> None:
    """Every thread of this process, and every thread or process it starts afterwards, on
    ``cpus`` only.

    A thread's affinity is its own (``sched_setaffinity`` of pid 0 moves the
    calling thread alone), so each thread already running is moved too: a
    node's gRPC and cache threads start before the node is placed. A worker
    may name CPUs its parent (the node, kept off them) may not use: what may
    be used is the machine's, and a cgroup's, to say.
    """
    if not hasattr(os, "sched_setaffinity"):
        raise ConfigError("CPU placement needs Linux (sched_setaffinity)")
    chosen = set(cpus)
    try:
        os.sched_setaffinity(0, chosen)
        moved: set[int] = set()
        # Again until no thread is new: one not moved yet may start another meanwhile.
        while left := set(_threads()) - moved:
            for tid in left:
                with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                    os.sched_setaffinity(tid, chosen)
            moved |= left
    except OSError as exc:  # none of them exists, or a cgroup forbids them all
        raise ConfigError(
            f"cannot keep to CPU {', '.join(map(str, sorted(chosen)))}: {exc.strerror}"
        ) from exc


def keep_off(cpus: Collection[int]) -> frozenset[int]:
    """Move this process (every thread) off ``cpus``, onto the other CPUs it may use.

    Returns the CPUs it could use before, for :func:`keep_to` to put it back.
    Raises :class:`ConfigError` if one of ``cpus`` is not one it may use, or if
    none would be left.
    """
    before = _usable_for(cpus)
    rest = before - set(cpus)
    if not rest:
        raise ConfigError(
            f"CPUs {', '.join(map(str, sorted(cpus)))} are every CPU this process may use: "
            "leave at least one to the gates"
        )
    keep_to(rest)
    return before


def _usable_for(cpus: Collection[int]) -> frozenset[int]:
    """The CPUs this process may use, if ``cpus`` are among them; else a :class:`ConfigError`."""
    usable = usable_cpus()
    missing = set(cpus) - usable
    if missing:
        raise ConfigError(
            f"CPU {', '.join(map(str, sorted(missing)))} is not one this process may use "
            f"(it may use {', '.join(map(str, sorted(usable)))})"
        )
    return usable


def _threads() -> list[int]:
    """The ids of this process's threads (Linux's /proc)."""
    try:
        return [int(t.name) for t in Path("/proc/self/task").iterdir()]
    except OSError as exc:  # without it, threads already running would stay where they are
        raise ConfigError(f"cannot list this process's threads: {exc.strerror}") from exc
