"""Logging a dependency's failures without a line per call.

A Redis that is down, or a peer that is away, fails every call that needs
it: hundreds a second. :class:`StateLog` logs the change of state (failing,
recovered) and, while it lasts, one count every ``every_s`` — enough to see
what happened and for how long, never enough to drown the log.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class StateLog:
    """``<event>_failing`` (warning) at the first failure, ``<event>_still_failing`` with
    the count every ``every_s`` while failures go on, ``<event>_recovered`` (info) at the
    first success after them."""

    def __init__(
        self,
        logger: Any,
        event: str,
        every_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        **fields: object,
    ) -> None:
        self._log = logger
        self._event = event
        self._every = every_s
        self._clock = clock
        self._fields = fields
        self.failing = False
        self.failures = 0  # since it began failing
        self._unreported = 0
        self._reported_at = 0.0

    def failed(self, error: str) -> None:
        now = self._clock()
        self.failures += 1
        if not self.failing:
            self.failing = True
            self._reported_at, self._unreported = now, 0
            self._log.warning(f"{self._event}_failing", error=error, **self._fields)
            return
        self._unreported += 1
        if now - self._reported_at >= self._every:
            self._log.warning(
                f"{self._event}_still_failing",
                error=error,
                failures=self._unreported,
                seconds=round(now - self._reported_at, 1),
                **self._fields,
            )
            self._reported_at, self._unreported = now, 0

    def ok(self) -> None:
        if self.failing:
            self._log.info(f"{self._event}_recovered", failures=self.failures, **self._fields)
            self.failing = False
            self.failures = 0
