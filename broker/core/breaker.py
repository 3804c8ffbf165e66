"""A circuit breaker: stop waiting on a dependency that keeps failing, and notice it is back.

A frozen peer, or a frozen Redis, makes every call that needs it wait out its
whole deadline. After ``threshold`` failures in a row the breaker *opens*:
calls are refused at once (the caller takes its fallback without waiting).
``probe_s`` after it opened, the next call is let through as a *probe* (half
open) while the others are still refused; its success closes the breaker,
its failure opens it for another ``probe_s``. So a dependency that answers
again is used from the first probe after it is back: within ``probe_s`` plus
one call when calls keep coming. Used on the event loop only.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

THRESHOLD = 3
PROBE_S = 0.5


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Breaker:
    """One dependency's breaker (see the module docstring)."""

    def __init__(
        self,
        threshold: int = THRESHOLD,
        probe_s: float = PROBE_S,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[State, State], None] = lambda old, new: None,
    ) -> None:
        if threshold < 1 or probe_s <= 0:
            raise ValueError("a breaker needs a threshold of at least 1 and a positive probe_s")
        self._threshold = threshold
        self._probe_s = probe_s
        self._clock = clock
        self._on_change = on_change
        self.state = State.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self.refused = 0  # calls refused at once while open

    def allow(self) -> bool:
        """Whether a call may go now (when half open: only the one probe)."""
        if self.state is State.CLOSED:
            return True
        if self.state is State.OPEN and self._clock() - self._opened_at >= self._probe_s:
            self._move(State.HALF_OPEN)
            return True  # this call is the probe
        self.refused += 1
        return False

    def retry_in_s(self) -> float:
        """How long until the next probe may go (0 when closed)."""
        if self.state is State.CLOSED:
            return 0.0
        return max(self._probe_s - (self._clock() - self._opened_at), 0.0)

    def succeeded(self) -> None:
        self._failures = 0
        if self.state is not State.CLOSED:
            self._move(State.CLOSED)

    def failed(self) -> None:
        self._failures += 1
        if self.state is State.HALF_OPEN or (
            self.state is State.CLOSED and self._failures >= self._threshold
        ):
            self._opened_at = self._clock()
            self._move(State.OPEN)

    def _move(self, new: State) -> None:
        old, self.state = self.state, new
        self._on_change(old, new)
