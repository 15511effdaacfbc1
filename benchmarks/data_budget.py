"""The data-budget table and plot (docs/accuracy.md): accuracy after recovery against the number of
training rows, dense and pruned, with paired-bootstrap intervals; and whether the recovery fine-tune's
first steps predict the final drop better than the guard's KL does.

Reads every ``gradprune eval`` output folder under the ``--runs`` folders (one per model, task and
training-row count; see docs/accuracy.md for the commands that make them); cells are compared within
one model and task.

Run: python benchmarks/data_budget.py --runs runs/budget runs/gemma-budget --split val [--plot docs/img/data_budget.png]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from swift_gradpruner.evaluation.cells import item_results, primary
from swift_gradpruner.evaluation.guard_calibration import spearman
from swift_gradpruner.evaluation.intervals import paired_difference

EARLY = 0.1
"""Share of the recovery fine-tune's first steps whose mean loss is the early-loss measure."""


def load_cells(runs: list[Path], split: str) -> list[dict[str, Any]]:
    """Every finished cell of ``split`` under ``runs``, with its training ``rows`` and ``model_name``."""
    cells = []
    for path in sorted(p for folder in runs for p in folder.glob(f"**/cells/*/*.{split}.json")):
        cell = json.loads(path.read_text(encoding="utf-8"))
        cell["rows"] = cell.get("trained_rows") or cell["sizes"]["train_rows"]  # fewer when the task ran short
        cell["model_name"] = Path(cell["model"]).name
        cells.append(cell)
    return cells


def dense_cells(cells: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """The dense cell of each (model, task, rows)."""
    return {(c["model_name"], c["task"], c["rows"]): c for c in cells if c["method"] == "dense"}


def dense_of(dense: dict, cell: dict[str, Any]) -> dict[str, Any] | None:
    return dense.get((cell["model_name"], cell["task"], cell["rows"]))


def variant(cell: dict[str, Any]) -> bool:
    """A cell that changed the recovery of a method: seam healing or cut layers trained in full."""
    return bool(cell.get("healing") or cell.get("full_trained"))


def label(cell: dict[str, Any]) -> str:
    return "dense" if cell["method"] == "dense" else f"{cell['method']} {cell['budget']}/{cell['num_layers']}"


def panel(cell: dict[str, Any]) -> str:
    return f"{cell['model_name']} {cell['task']}"


def rows_table(cells: list[dict[str, Any]]) -> str:
    """One line per (task, rows, pruned model): dense and pruned accuracy, their paired difference."""
    dense = dense_cells(cells)
    lines = ["| model, task | rows | pruned | accuracy | dense | vs dense [95% CI] |", "|---|---|---|---|---|---|"]
    order = sorted(cells, key=lambda c: (panel(c), c["rows"], c["method"] != "dense", c["budget"], c["method"]))
    for cell in order:
        base = dense_of(dense, cell)
        if cell["method"] == "dense" or base is None or variant(cell):
            continue
        diff = paired_difference([(item_results(cell, "after"), item_results(base, "after"))])
        tie = " tie" if diff.tie else ""
        lines.append(f"| {panel(cell)} | {cell['rows']} | {label(cell)} | {primary(cell, 'after'):.1f} | "
                     f"{primary(base, 'after'):.1f} | {diff}{tie} |")  # fmt: skip
    return "\n".join(lines)


def healing_table(cells: list[dict[str, Any]]) -> str:
    """Each healed cell (seam healing, or cut layers trained in full) against the same method without it
    (same task, rows and layers), before and after recovery, with the guard's KL of both."""
    plain = {(panel(c), c["rows"], c["budget"], c["method"]): c for c in cells if not variant(c)}
    lines = ["| model, task | rows | pruned | before recovery | after recovery | healed - plain, after [95% CI] "
             "| guard KL |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for cell in cells:
        base = plain.get((panel(cell), cell["rows"], cell["budget"], cell["method"].split(":")[0]))
        if not variant(cell) or base is None:
            continue
        diff = paired_difference([(item_results(cell, "after"), item_results(base, "after"))])
        before = f"{primary(base, 'before'):.1f} -> {primary(cell, 'before'):.1f}" if cell.get("before") else "-"
        lines.append(f"| {panel(cell)} | {cell['rows']} | {label(cell)} | {before} | {primary(base, 'after'):.1f} -> "
                     f"{primary(cell, 'after'):.1f} | {diff}{' tie' if diff.tie else ''} | "
                     f"{base['guard']['kl']:.2f} -> {cell['guard']['kl']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def early_loss(cell: dict[str, Any]) -> float | None:
    curve = cell.get("recovery_loss")
    if not curve:
        return None
    head = curve[: max(1, round(EARLY * len(curve)))]
    return sum(head) / len(head)


def learnability(cells: list[dict[str, Any]]) -> str:
    """Spearman, per model (the KL's scale differs between models), over plain pruned cells (no healing
    variants: they share a plain cell's pruned model and KL) of the final drop against (a) the guard's KL
    before recovery and (b) the early recovery loss minus the dense model's early loss on the same rows in
    the same order."""
    dense = dense_cells(cells)
    points: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for cell in cells:
        base = dense_of(dense, cell)
        if cell["method"] == "dense" or variant(cell) or base is None or None in (early_loss(cell), early_loss(base)):
            continue
        drop = primary(base, "after") - primary(cell, "after")
        points[cell["model_name"]].append((cell["guard"]["kl"], early_loss(cell) - early_loss(base), drop))
    lines = []
    for model, found in sorted(points.items()):
        if len(found) < 3:
            lines.append(f"{model}: {len(found)} pruned cells with loss curves, too few for a rank correlation")
            continue
        kl, early, drop = zip(*found)
        lines.append(f"{model}: {len(found)} pruned cells: Spearman(drop, guard KL) = {spearman(drop, kl):.2f}; "
                     f"Spearman(drop, early recovery loss - dense's, first {EARLY:.0%} of steps) = "
                     f"{spearman(drop, early):.2f}")  # fmt: skip
    return "\n".join(lines) or "no pruned cell with a loss curve"


def plot(cells: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = defaultdict(set)
    for cell in cells:
        counts[panel(cell)].add(cell["rows"])
    panels = sorted(p for p, rows in counts.items() if len(rows) > 1)  # a curve needs two row counts
    if not panels:
        raise SystemExit(f"no model and task has cells at two row counts: {path} not written")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, name in zip(axes[0], panels):
        series: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for cell in cells:
            if panel(cell) == name and not variant(cell):
                series[label(cell)].append((cell["rows"], primary(cell, "after")))
        for line, points in sorted(series.items(), key=lambda kv: (kv[0] != "dense", kv[0])):
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=line, color="black" if line == "dense" else None)
        ax.set_xscale("log")
        ax.set_xticks(sorted(counts[name]), [str(r) for r in sorted(counts[name])])
        ax.minorticks_off()
        ax.set_xlabel("training rows (one epoch of LoRA)")
        ax.set_ylabel("accuracy after recovery (%)")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True)
    parser.add_argument("--split", default="val", choices=["val", "test"])
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    cells = load_cells(args.runs, args.split)
    print(rows_table(cells))
    print()
    print(healing_table(cells))
    print()
    print(learnability(cells))
    if args.plot:
        plot(cells, args.plot)


if __name__ == "__main__":
    main()
