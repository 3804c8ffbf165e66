"""In-node latency recording: time from request in to response out, per method."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from fractions import Fraction


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank ``q``-th percentile (0-100) of already sorted values; 0.0 when empty."""
    if not ordered:
        return 0.0
    # The smallest rank with at least q % of the values at or below it, in exact arithmetic
    # (round() rounds half to even, and 99.9 * 1000 is not 99900 in floats).
    rank = math.ceil(Fraction(str(q)) * len(ordered) / 100)
    return float(ordered[max(1, min(len(ordered), rank)) - 1])


class LatencyRecorder:
    """Keeps the most recent durations (nanoseconds) of one kind of call."""

    def __init__(self, keep: int = 500_000) -> None:
        self._samples: deque[int] = deque(maxlen=keep)

    def record(self, nanos: int) -> None:
        self._samples.append(nanos)

    def reset(self) -> None:
        self._samples.clear()

    def __len__(self) -> int:
        return len(self._samples)

    def percentile_us(self, q: float) -> float:
        """The ``q``-th percentile in microseconds."""
        return percentile(sorted(self._samples), q) / 1000


class Metrics:
    """The node's latency recorders, keyed by full method name."""

    def __init__(self) -> None:
        self.by_method: dict[str, LatencyRecorder] = {}

    def recorder(self, method: str) -> LatencyRecorder:
        rec = self.by_method.get(method)
        if rec is None:
            rec = self.by_method[method] = LatencyRecorder()
        return rec
