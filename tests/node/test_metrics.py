"""In-node latency recording (broker/node/metrics.py): percentiles, bounded recorders."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

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


def close_to(got: float, exact: float) -> bool:
    """Within the histogram's 1 %, never below."""
    return exact <= got <= exact * 1.0101


def test_a_recorder_reports_microseconds_within_one_percent_never_less() -> None:
    rec = LatencyRecorder()
    for nanos in (5_000, 1_500, 3_000):
        rec.record(nanos)
    assert len(rec) == 3
    assert close_to(rec.percentile_us(50), 3.0)
    assert close_to(rec.percentile_us(100), 5.0)
    assert close_to(rec.percentile_us(0), 1.5)


@given(st.lists(st.integers(1, 10**12), min_size=1, max_size=300), st.sampled_from([50, 99, 100]))
def test_a_recorders_percentile_is_the_exact_ones_within_one_percent(
    values: list[int], q: float
) -> None:
    rec = LatencyRecorder()
    for v in values:
        rec.record(v)
    exact = percentile(sorted(values), q) / 1000
    got = rec.percentile_us(q)
    if exact <= LatencyRecorder.FLOOR_NS / 1000:
        assert got == LatencyRecorder.FLOOR_NS / 1000
    elif exact * 1000 >= LatencyRecorder.FLOOR_NS * LatencyRecorder.GROWTH**LatencyRecorder.BUCKETS:
        assert got >= exact / 1.0101  # beyond the last bound: the top bucket
    else:
        assert close_to(got, exact), (got, exact)


def test_a_recorders_memory_does_not_grow_with_traffic() -> None:
    rec = LatencyRecorder()
    size = len(rec._counts)
    for i in range(200_000):
        rec.record(1_000 + i * 37)
    assert len(rec) == 200_000 and len(rec._counts) == size


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
