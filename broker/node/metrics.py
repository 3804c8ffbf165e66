"""In-node latency recording: time from request in to response out, per method."""

from __future__ import annotations

import math
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
    """A fixed-size histogram of one kind of call's durations (nanoseconds in).

    Buckets grow by 1 % from 1 µs to about 20 minutes (2,100 counters, whatever
    the traffic): a percentile is exact to within 1 % (the bucket's upper bound
    is reported, never less than the value), and memory stays flat however
    long the node runs (a history of samples grew by tens of MB under load).
    """

    FLOOR_NS = 1_000
    GROWTH = 1.01
    BUCKETS = 2_100

    def __init__(self) -> None:
        self._counts = [0] * (self.BUCKETS + 1)  # the last: anything longer
        self._count = 0
        self._log_growth = math.log(self.GROWTH)

    def record(self, nanos: int) -> None:
        if nanos <= self.FLOOR_NS:
            index = 0
        else:
            index = min(math.ceil(math.log(nanos / self.FLOOR_NS) / self._log_growth), self.BUCKETS)
        self._counts[index] += 1
        self._count += 1

    def reset(self) -> None:
        self._counts = [0] * (self.BUCKETS + 1)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def percentile_us(self, q: float) -> float:
        """The nearest-rank ``q``-th percentile in microseconds: the upper bound of the bucket
        holding it (0.0 when nothing was recorded)."""
        if not self._count:
            return 0.0
        rank = max(1, min(self._count, math.ceil(Fraction(str(q)) * self._count / 100)))
        seen = 0
        for index, n in enumerate(self._counts):
            seen += n
            if seen >= rank:
                return self.FLOOR_NS * self.GROWTH**index / 1000
        raise AssertionError("unreachable: the counts sum to the count")


class Metrics:
    """The node's latency recorders, keyed by full method name."""

    def __init__(self) -> None:
        self.by_method: dict[str, LatencyRecorder] = {}

    def recorder(self, method: str) -> LatencyRecorder:
        rec = self.by_method.get(method)
        if rec is None:
            rec = self.by_method[method] = LatencyRecorder()
        return rec
