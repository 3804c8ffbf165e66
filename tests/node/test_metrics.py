"""In-node latency recording (broker/node/metrics.py): percentiles, bounded recorders."""

from __future__ import annotations

import math

import pytest

from broker.node.metrics import LatencyRecorder, Metrics, percentile


def nearest_rank(ordered: list[int], q: float) -> int:
    """The textbook nearest-rank percentile: the ceil(q/100 * n)-th smallest value (1-based)."""
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def test_percentile_of_nothing_is_zero() -> None:
    assert percentile([], 50) == 0.0
    assert percentile((), 99) == 0.0


@pytest.mark.parametrize("q", [0, 1, 50, 99, 100])
def test_percentile_of_a_single_value_is_that_value_at_every_q(q: float) -> None:
    got = percentile([7], q)
    assert got == 7.0 and isinstance(got, float)


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([1, 2, 3, 4, 5], 50, 3),  # the median of an odd count
        ([1, 2, 3, 4], 50, 2),  # nearest rank takes the lower middle, no interpolation
        ([10, 20, 30], 100, 30),  # q=100 is the largest
        ([10, 20, 30], 0, 10),  # q=0 clamps to the smallest, not index -1 (the largest)
        ([10, 20, 30], 250, 30),  # beyond 100 clamps to the largest
        (list(range(1, 1001)), 99, 990),
        (list(range(1, 201)), 99, 198),
        (list(range(1, 101)), 99.5, 100),
    ],
)
def test_percentile_is_the_nearest_rank_value(values: list[int], q: float, expected: int) -> None:
    assert nearest_rank(values, min(q, 100)) == expected  # the expectation is the definition's
    assert percentile(values, q) == float(expected)


@pytest.mark.parametrize(("n", "q"), [(10, 50), (100, 99), (2, 50)])
def test_percentile_at_an_exact_odd_rank_is_that_rank(n: int, q: float) -> None:
    values = list(range(1, n + 1))
    assert percentile(values, q) == nearest_rank(values, q)


def test_a_recorder_keeps_only_the_most_recent_durations() -> None:
    rec = LatencyRecorder(keep=3)
    for nanos in (9_000_000, 1_000, 2_000, 3_000, 4_000):
        rec.record(nanos)
    assert len(rec) == 3
    assert rec.percentile_us(0) == 2.0  # 9 ms and 1 µs, the oldest, were dropped
    assert rec.percentile_us(100) == 4.0


def test_a_recorder_reports_microseconds_from_unsorted_nanoseconds() -> None:
    rec = LatencyRecorder()
    for nanos in (5_000, 1_500, 3_000):
        rec.record(nanos)
    assert rec.percentile_us(50) == 3.0
    assert rec.percentile_us(100) == 5.0
    assert rec.percentile_us(0) == 1.5


def test_a_reset_recorder_is_empty() -> None:
    rec = LatencyRecorder()
    rec.record(1_000)
    rec.reset()
    assert len(rec) == 0
    assert rec.percentile_us(99) == 0.0


def test_metrics_has_one_recorder_per_method() -> None:
    metrics = Metrics()
    check = metrics.recorder("/yikatong.v1.Gate/Check")
    check.record(1_000)
    assert metrics.recorder("/yikatong.v1.Gate/Check") is check
    other = metrics.recorder("/yikatong.v1.Recognition/Recognize")
    assert other is not check and len(other) == 0
    assert set(metrics.by_method) == {
        "/yikatong.v1.Gate/Check",
        "/yikatong.v1.Recognition/Recognize",
    }
    assert len(metrics.by_method["/yikatong.v1.Gate/Check"]) == 1


def test_a_fractional_percentile_is_computed_exactly() -> None:
    """99.9 % of 1,000 values is the 999th: float arithmetic would say 999.0000000000001 → 1000."""
    assert percentile(list(range(1, 1001)), 99.9) == 999.0
