"""How well the quality guard's KL predicts the accuracy a pruned model loses, from ``gradprune eval`` cells.

The guard (guard.py) measures KL(dense || pruned) on held-out training rows *before* the recovery
fine-tune and warns above ``--gradprune_max_kl``; what a user cares about is the accuracy lost
*after* it. Each pruned cell gives one point (its guard KL, the dense cell's accuracy minus its own
after recovery, on the same task), so a run on your own tasks says how far to trust the threshold:
the rank correlation of KL with the drop, the cells a threshold leaves quiet although they lost more
than ``DAMAGED`` points (misses), and the cells it warns on although they lost at most ``HEALTHY``
(false alarms).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .cells import primary

DAMAGED = 5.0
"""A cell that lost more than this many points after recovery should be warned on."""
HEALTHY = 2.0
"""A cell that lost at most this many points should pass quietly."""


@dataclass(frozen=True)
class GuardPoint:
    task: str
    method: str
    removed: tuple[int, ...]
    kl: float
    """The guard's KL (nats/token) on the task's held-out training rows, before recovery."""
    drop: float
    """Dense accuracy minus the cell's, after the same recovery fine-tune, in points."""


def guard_points(cells: Sequence[dict[str, Any]]) -> list[GuardPoint]:
    """One point per pruned cell with a guard measurement and a dense cell of the same task; cells
    that removed the same layers of the same task (e.g. an ``auto`` cell that picked a count also run
    as a fixed one) are one model and count once."""
    dense = {c["task"]: c for c in cells if c["method"] == "dense"}
    points: dict[tuple, GuardPoint] = {}
    for cell in cells:
        if cell["method"] == "dense" or "guard" not in cell or cell["task"] not in dense or not cell.get("removed"):
            continue
        model = (cell["task"], tuple(cell["removed"]), tuple(sorted(cell.get("merged", {}).items())))
        drop = primary(dense[cell["task"]], "after") - primary(cell, "after")
        points.setdefault(model, GuardPoint(cell["task"], cell["method"], tuple(cell["removed"]),
                                            cell["guard"]["kl"], drop))  # fmt: skip
    return sorted(points.values(), key=lambda p: p.kl)


def ranks(values: Sequence[float]) -> list[float]:
    """Ranks from 1, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            out[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return out


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the (tie-averaged) ranks; NaN when either
    side is constant or there are fewer than 3 points."""
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} x values but {len(ys)} y values")
    if len(xs) < 3:
        return float("nan")
    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / (sxx * syy) ** 0.5 if sxx and syy else float("nan")


def misses_and_false_alarms(
    points: Sequence[GuardPoint], threshold: float
) -> tuple[list[GuardPoint], list[GuardPoint]]:
    """Cells the guard leaves quiet (KL <= threshold) that lost more than DAMAGED points, and cells it
    warns on (KL > threshold) that lost at most HEALTHY points."""
    misses = [p for p in points if p.drop > DAMAGED and p.kl <= threshold]
    false_alarms = [p for p in points if p.drop <= HEALTHY and p.kl > threshold]
    return misses, false_alarms


def separating_range(points: Sequence[GuardPoint]) -> tuple[float, float] | None:
    """(low, high): every threshold in [low, high) warns on every damaged cell and on no healthy one;
    None when no threshold does (or either kind of cell is missing)."""
    healthy = [p.kl for p in points if p.drop <= HEALTHY]
    damaged = [p.kl for p in points if p.drop > DAMAGED]
    if not healthy or not damaged or max(healthy) >= min(damaged):
        return None
    return max(healthy), min(damaged)


def _verdict(found: tuple[float, float] | None, damaged: int, healthy: int) -> str:
    if not damaged or not healthy:
        missing = f"more than {DAMAGED:g}" if not damaged else f"at most {HEALTHY:g}"
        return f"No model lost {missing} points, so these cells cannot place the threshold."
    if found is None:
        return "No threshold separates the two here."
    return f"Every threshold in [{found[0]:.3f}, {found[1]:.3f}) separates the two here."


def markdown(cells: Sequence[dict[str, Any]], threshold: float) -> list[str]:
    """The results.md section: every point, the rank correlation, and what ``threshold`` would do."""
    points = guard_points(cells)
    if not points:
        return []
    misses, alarms = misses_and_false_alarms(points, threshold)
    damaged = sum(p.drop > DAMAGED for p in points)
    healthy = sum(p.drop <= HEALTHY for p in points)
    found = separating_range(points)
    lines = [
        "## Quality guard: KL before recovery vs accuracy lost after it", "",
        f"Spearman rank correlation over {len(points)} pruned models: "
        f"{spearman([p.kl for p in points], [p.drop for p in points]):.3f}. "
        f"At max_kl {threshold:g}: {len(misses)} of {damaged} models that lost more than {DAMAGED:g} points "
        f"passed quietly; {len(alarms)} of {healthy} that lost at most {HEALTHY:g} were warned on. "
        + _verdict(found, damaged, healthy),
        "", "| task | method | removed | KL (nats/token) | drop (points) | at max_kl |", "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for p in points:
        verdict = "warns" if p.kl > threshold else "quiet"
        verdict += " (miss)" if p in misses else " (false alarm)" if p in alarms else ""
        lines.append(f"| {p.task} | {p.method} | {len(p.removed)} | {p.kl:.3f} | {p.drop:+.1f} | {verdict} |")
    return [*lines, ""]
