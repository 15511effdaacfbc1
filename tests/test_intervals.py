"""Paired bootstrap intervals of accuracy differences (evaluation/intervals.py)."""

import numpy as np
import pytest

from swift_gradpruner.evaluation.intervals import paired_difference


def test_certain_and_null_differences():
    assert str(paired_difference([([1] * 50, [0] * 50)])) == "+100.0 [+100.0, +100.0]"
    same = paired_difference([([1, 0, 1, 1], [1, 0, 1, 1])])
    assert (same.diff, same.low, same.high, same.tie) == (0.0, 0.0, 0.0, True)
    with pytest.raises(ValueError, match="differ in number"):
        paired_difference([([1, 0], [1])])


def test_interval_matches_the_normal_approximation_and_tasks_weigh_equally():
    rng = np.random.default_rng(1)
    a = (rng.random(2000) < 0.60).astype(int)
    b = np.where(rng.random(2000) < 0.8, a, 1 - a)  # paired: b mostly agrees with a
    got = paired_difference([(a, b)], resamples=4000)
    delta = a - b
    se = 100 * delta.std() / np.sqrt(delta.size)
    assert got.diff == pytest.approx(100 * delta.mean())
    assert got.high - got.low == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert got.low < got.diff < got.high
    # Two tasks: the mean of the per-task differences, whatever their sizes.
    small = paired_difference([([1] * 10, [0] * 10), ([0] * 1000, [0] * 1000)])
    assert small.diff == pytest.approx(50.0) and not small.tie
