"""The guard-calibration section of gradprune eval's results: rank correlation, misses, false alarms."""

import itertools
import random

import pytest

from swift_gradpruner.evaluation import guard_calibration as gc


def brute_spearman(xs, ys):
    """Ranks counted directly (below + half of the equal ones, self included), then Pearson."""

    def rank(values, v):
        return sum(u < v for u in values) + (sum(u == v for u in values) + 1) / 2

    rx, ry = [rank(xs, v) for v in xs], [rank(ys, v) for v in ys]
    n = len(xs)
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5


def test_spearman_matches_the_textbook_forms():
    gen = random.Random(0)
    for n in (3, 7, 20):
        xs, ys = [gen.random() for _ in range(n)], [gen.random() for _ in range(n)]
        d2 = sum((a - b) ** 2 for a, b in zip(gc.ranks(xs), gc.ranks(ys)))
        assert gc.spearman(xs, ys) == pytest.approx(1 - 6 * d2 / (n * (n * n - 1)))  # no ties
        ties = [round(3 * v) for v in xs]
        assert gc.spearman(ties, ys) == pytest.approx(brute_spearman(ties, ys))
    assert gc.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1)
    assert gc.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1)
    assert gc.ranks([5, 1, 5, 2]) == [3.5, 1, 3.5, 2]
    assert gc.spearman([1, 1, 1], [1, 2, 3]) != gc.spearman([1, 1, 1], [1, 2, 3])  # NaN: constant side
    with pytest.raises(ValueError, match="3 x values but 2"):
        gc.spearman([1, 2, 3], [1, 2])


def cell(task, method, removed, kl, acc):
    return {"task": task, "method": method, "budget": len(removed), "metric": "acc", "removed": removed,
            "merged": {}, "guard": {"kl": kl}, "after": {"acc": acc}}  # fmt: skip


def test_points_misses_false_alarms_and_the_separating_range():
    cells = [
        cell("a", "dense", [], 0.0, 0.60),
        cell("b", "dense", [], 0.0, 0.80),
        cell("a", "bi", [1, 2], 0.2, 0.59),  # lost 1 point: healthy
        cell("a", "bi:prune_layers=auto", [1, 2], 0.2, 0.59),  # the same model again: counted once
        cell("a", "bi", [1, 2, 3], 0.4, 0.50),  # lost 10: damaged
        cell("b", "bi", [1, 2], 0.3, 0.77),  # lost 3: neither
        cell("b", "bi", [1, 2, 3, 4], 0.9, 0.60),  # lost 20: damaged
        cell("c", "bi", [1], 0.1, 0.5),  # no dense cell for task c: no point
    ]
    points = gc.guard_points(cells)
    assert [(p.task, p.removed, round(p.drop, 6)) for p in points] == [
        ("a", (1, 2), 1.0), ("b", (1, 2), 3.0), ("a", (1, 2, 3), 10.0), ("b", (1, 2, 3, 4), 20.0)]  # fmt: skip
    assert gc.separating_range(points) == (0.2, 0.4)
    for threshold in (0.2, 0.3, 0.39):
        assert gc.misses_and_false_alarms(points, threshold) == ([], [])
    misses, alarms = gc.misses_and_false_alarms(points, 0.5)
    assert [p.removed for p in misses] == [(1, 2, 3)] and alarms == []
    misses, alarms = gc.misses_and_false_alarms(points, 0.1)
    assert misses == [] and [p.removed for p in alarms] == [(1, 2)]
    text = "\n".join(gc.markdown(cells, 0.5))
    assert "Spearman rank correlation over 4 pruned models: 1.000" in text
    assert "1 of 2 models that lost more than 5 points passed quietly" in text
    assert "| a | bi | 3 | 0.400 | +10.0 | quiet (miss) |" in text
    assert "[0.200, 0.400) separates" in text
    # A healthy model measured above a damaged one: nothing separates them.
    worse = [*cells, cell("b", "bi", [5], 0.95, 0.80)]
    assert gc.separating_range(gc.guard_points(worse)) is None
    assert "No threshold separates" in "\n".join(gc.markdown(worse, 0.5))
    assert gc.markdown([c for c in cells if c["method"] == "dense"], 0.5) == []
    only_damaged = [c for c in cells if c["task"] != "a" or c["method"] == "dense" or len(c["removed"]) == 3]
    assert "No model lost at most 2 points, so these cells cannot place" in "\n".join(gc.markdown(only_damaged, 0.5))


def test_every_threshold_in_the_range_separates_and_none_outside():
    gen = random.Random(1)
    seen = set()
    for _ in range(50):
        cells = [cell("t", "dense", [], 0.0, 0.5)] + [
            cell("t", "m", [i], gen.random(), 0.5 - gen.choice([0, 0.01, 0.03, 0.1])) for i in range(6)]  # fmt: skip
        points = gc.guard_points(cells)
        found = gc.separating_range(points)
        grid = sorted({p.kl for p in points} | {0.0, 1.0})
        ok = [t for t in itertools.chain(grid, (a + (b - a) / 2 for a, b in zip(grid, grid[1:])))
              if gc.misses_and_false_alarms(points, t) == ([], [])]  # fmt: skip
        has_both = any(p.drop > gc.DAMAGED for p in points) and any(p.drop <= gc.HEALTHY for p in points)
        seen.add(found is None)
        if found is None:
            assert not ok or not has_both
        else:
            assert ok and all(found[0] <= t < found[1] for t in ok)
    assert seen == {True, False}  # both outcomes were exercised
