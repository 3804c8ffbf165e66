"""The node's background loops, supervised: none dies silently.

Each loop (the trust watcher, the bundle refresher, the component checks, and
any later one) runs under :class:`Supervisor`. A loop that raises is logged
with its traceback, its health name (``yikatong.task.<name>``) turns
NOT_SERVING, and it is restarted after a backoff that doubles from
``initial_backoff_s`` up to ``max_backoff_s`` (reset once a run has lasted a
minute). A loop that returns is restarted too: these loops are meant to run
for the node's whole life.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger(__name__)

Loop = Callable[[], Awaitable[None]]
OnChange = Callable[[str, bool], Awaitable[None]]
STABLE_S = 60.0
STOP_PATIENCE_S = 2.0  # how long a cancelled loop may take to end before it is cancelled again


def task_health_name(name: str) -> str:
    return f"yikatong.task.{name}"


class Supervisor:
    """Starts named loops and keeps them running."""

    def __init__(
        self,
        on_change: OnChange | None = None,
        initial_backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        self._on_change = on_change
        self._initial = initial_backoff_s
        self._max = max_backoff_s
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.failures: dict[str, int] = {}
        self.healthy: dict[str, bool] = {}

    def start(self, name: str, loop: Loop) -> None:
        if name in self._tasks:
            raise ValueError(f"a loop named {name!r} is running already")
        self.failures[name] = 0
        self.healthy[name] = True
        self._tasks[name] = asyncio.create_task(self._run(name, loop), name=f"loop:{name}")

    async def _report(self, name: str, ok: bool, first: bool = False) -> None:
        if self.healthy.get(name) == ok and not first:
            return
        self.healthy[name] = ok
        if self._on_change is not None:
            try:
                await self._on_change(task_health_name(name), ok)
            except Exception:  # reporting must not take the supervisor down
                log.exception("task_health_not_reported", task=name)

    async def _run(self, name: str, loop: Loop) -> None:
        backoff = self._initial
        await self._report(name, True, first=True)  # the health name exists from the start
        while True:
            started = time.monotonic()
            try:
                await loop()
                log.error("task_returned", task=name)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("task_failed", task=name)
            self.failures[name] += 1
            await self._report(name, False)
            if time.monotonic() - started >= STABLE_S:
                backoff = self._initial
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max)
            log.info("task_restarted", task=name, failures=self.failures[name])
            await self._report(name, True)

    def running(self) -> list[str]:
        """The names of the loops running now."""
        return [name for name, task in self._tasks.items() if not task.done()]

    async def stop_one(self, name: str) -> None:
        """Stop the loop ``name`` (not restarted); nothing if there is none."""
        task = self._tasks.pop(name, None)
        if task is not None:
            await _cancel_all({task})

    async def stop(self, patience_s: float = STOP_PATIENCE_S) -> None:
        """Cancel every loop and wait for it. A loop still running ``patience_s`` later
        lost its cancellation (a library that swallows one that comes as what it awaits
        finishes): it is named in the log and cancelled again, until it ends."""
        await _cancel_all(set(self._tasks.values()), patience_s)
        self._tasks.clear()


async def _cancel_all(tasks: set[asyncio.Task[None]], patience_s: float = STOP_PATIENCE_S) -> None:
    pending = set(tasks)
    for task in pending:
        task.cancel()
    while pending:
        _, pending = await asyncio.wait(pending, timeout=patience_s)
        for task in pending:
            log.warning("task_ignored_cancellation", task=task.get_name())
            task.cancel()
    for task in tasks:  # every outcome retrieved: none is reported as never retrieved
        if not task.cancelled():
            task.exception()
