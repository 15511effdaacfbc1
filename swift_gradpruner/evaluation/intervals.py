"""Paired bootstrap confidence intervals for accuracy differences between two methods.

Two cells of the same task are scored on the same items, so their difference is resampled as a
pair: each resample draws the task's items with replacement once and scores both methods on that
draw. Over several tasks the reported difference is the mean of the per-task differences (each
task weighs the same, as in the tables), and each task is resampled on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 10_000


@dataclass(frozen=True)
class Interval:
    """A difference a - b in accuracy points, with its 95% paired-bootstrap interval."""

    diff: float
    low: float
    high: float

    @property
    def tie(self) -> bool:
        """The interval contains 0: the data do not tell the two apart."""
        return self.low <= 0 <= self.high

    def __str__(self) -> str:
        return f"{self.diff:+.1f} [{self.low:+.1f}, {self.high:+.1f}]"


def paired_difference(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], resamples: int = RESAMPLES,
                      seed: int = 0) -> Interval:  # fmt: skip
    """Mean over tasks of (accuracy a - accuracy b), in points, from per-item 1/0 vectors of the same
    items in the same order (one (a, b) pair per task), with a 95% percentile interval."""
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    point = 0.0
    for a, b in pairs:
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if a.shape != b.shape or a.size == 0:
            raise ValueError(f"paired items differ in number ({a.size} vs {b.size}) or are empty")
        delta = a - b
        point += delta.mean()
        picks = rng.integers(0, delta.size, size=(resamples, delta.size))
        total += delta[picks].mean(axis=1)
    tasks = len(pairs)
    draws = 100 * total / tasks
    low, high = np.percentile(draws, [2.5, 97.5])
    return Interval(diff=100 * point / tasks, low=float(low), high=float(high))
