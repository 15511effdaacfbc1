"""results.json, results.md (the shape of the paper's Table 1) and the plots of a ``gradprune eval`` run."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import GradPruneConfig
from .cells import item_results, primary
from .guard_calibration import markdown as guard_markdown
from .intervals import RESAMPLES, paired_difference


def difference(cells: Sequence[dict[str, Any]], a: tuple[str, int], b: tuple[str, int], when: str = "after"):
    """Paired-bootstrap interval of row ``a`` minus row ``b`` ((method, budget) each) over the tasks both
    have, or None when a task lacks per-item results."""
    by_row: dict[tuple[str, int], dict[str, dict]] = defaultdict(dict)
    for cell in cells:
        by_row[(cell["method"], cell["budget"])][cell["task"]] = cell
    tasks = [t for t in by_row.get(a, {}) if t in by_row.get(b, {})]
    pairs = [(item_results(by_row[a][t], when), item_results(by_row[b][t], when)) for t in tasks]
    if not pairs or any(x is None or y is None for x, y in pairs):
        return None
    return paired_difference(pairs)


def table(cells: Sequence[dict[str, Any]], when: str) -> tuple[list[str], list[tuple[str, int, dict[str, float]]]]:
    """(tasks, rows): one row per (method, budget) with the metric per task, its average over the
    tasks the row has, and ``drop`` = dense average minus the row's, on the same tasks."""
    tasks = list(dict.fromkeys(c["task"] for c in cells))
    grouped: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    for cell in cells:
        if cell[when] is None:  # "before" of a split that was sealed during a val sweep
            continue
        grouped[(cell["method"], cell["budget"])][cell["task"]] = primary(cell, when)
    dense = next((v for (m, _), v in grouped.items() if m == "dense"), {})
    rows = []
    for (method, budget), values in grouped.items():
        shared = [t for t in values if t in dense]
        row = dict(values)
        row["avg"] = sum(values.values()) / len(values)
        if shared and method != "dense":
            row["drop"] = sum(dense[t] - values[t] for t in shared) / len(shared)
        rows.append((method, budget, row))
    rows.sort(key=lambda r: (r[1], r[0] != "dense"))
    return tasks, rows


def markdown(cells: Sequence[dict[str, Any]], split: str) -> str:
    if not cells:
        return "No finished cells.\n"
    first = cells[0]
    metric_of = {c["task"]: c["metric"] for c in cells}
    lines = [
        f"# gradprune eval: {Path(first['model']).name}, {first['num_layers']} layers, split `{split}`",
        "",
        f"Items per task: {first['after']['items']} (or all of the split); recovery fine-tune: LoRA "
        f"r={first['recipe']['lora_rank']}, lr {first['recipe']['learning_rate']}, {first['recipe']['epochs']} "
        f"epoch(s) over {first['sizes']['train_rows']} training rows per task; device {first['device']}.",
        "Metric per task: " + ", ".join(f"{t} {m}" for t, m in metric_of.items()) + " (lm-eval conventions), in %.",
        "`drop` = dense minus the method, averaged over the tasks (positive = worse than dense).",
        "",
    ]
    reference = "gradprune" if any(c["method"] == "gradprune" for c in cells) else None
    lines += [
        "Differences in points with paired-bootstrap 95% intervals (the same items resampled together, "
        f"{RESAMPLES:,} resamples, tasks weighted equally); *tie* = the interval contains 0.",
        "",
    ]
    for when, title in (("after", "After the recovery fine-tune"), ("before", "Before any fine-tune (pruned only)")):
        tasks, rows = table(cells, when)
        head = "| method | removed | " + " | ".join(tasks) + " | avg | vs dense |"
        head += f" vs {reference} (same removed) |" if reference else ""
        lines += [f"## {title}", "", head, "|---|---|" + "---|" * (len(tasks) + 2 + bool(reference))]
        for method, budget, row in rows:
            values = [f"{row[t]:.1f}" if t in row else "" for t in tasks]
            line = f"| {method} | {budget} | " + " | ".join(values) + f" | {row['avg']:.1f} |"
            dense = next(((m, b) for m, b, _ in rows if m == "dense"), None)
            line += f" {_shown(difference(cells, (method, budget), dense, when))} |" if dense else " |"
            if reference:
                line += f" {_shown(difference(cells, (method, budget), (reference, budget), when))} |"
            lines.append(line.replace(" |  |", " | |"))
        lines.append("")
    lines += ["## Answer loss on the split's right answers (nats/token)", "",
              "| method | removed | before recovery | after recovery |", "|---|---|---|---|"]  # fmt: skip
    losses: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    for cell in cells:
        before = cell["before"]["loss"] if cell["before"] else float("nan")
        losses[(cell["method"], cell["budget"])].append((before, cell["after"]["loss"]))
    for (method, budget), pairs in sorted(losses.items(), key=lambda kv: (kv[0][1], kv[0][0] != "dense")):
        before = sum(p[0] for p in pairs) / len(pairs)
        after = sum(p[1] for p in pairs) / len(pairs)
        lines.append(f"| {method} | {budget} | {before:.3f} | {after:.3f} |".replace("nan", "-"))
    lines += ["", *guard_markdown(cells, GradPruneConfig().max_kl)]
    lines += ["## Layers removed", "", "| task | method | removed | merged (layer -> into) |", "|---|---|---|---|"]
    for cell in cells:
        if cell["budget"]:
            merged = ", ".join(f"{k}->{v}" for k, v in cell.get("merged", {}).items()) or "-"
            lines.append(f"| {cell['task']} | {cell['method']} | {cell['removed']} | {merged} |")
    return "\n".join(lines) + "\n"


def _shown(interval) -> str:
    if interval is None:
        return ""
    return f"{interval}" + (" tie" if interval.tie else "")


def plot(cells: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """accuracy_vs_layers.png (after recovery, a line per method) and recovery.png (before/after)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    after_tasks, after_rows = table(cells, "after")
    _, before_rows = table(cells, "before")
    dense = next((row["avg"] for m, _, row in after_rows if m == "dense"), None)
    paths = []
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    methods = list(dict.fromkeys(m for m, b, _ in after_rows if m != "dense"))
    for method in methods:
        points = sorted((b, row["avg"]) for m, b, row in after_rows if m == method)
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=method)
    if dense is not None:
        ax.axhline(dense, color="black", linestyle="--", linewidth=1, label="dense (fine-tuned)")
    ax.set_xlabel("decoder layers removed")
    ax.set_ylabel(f"average over {len(after_tasks)} tasks (%)")
    ax.set_title("Accuracy after the recovery fine-tune")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(_save(fig, out_dir / "accuracy_vs_layers.png"))
    plt.close(fig)

    labels = [f"{m} n={b}" for m, b, _ in after_rows]
    before = {(m, b): row["avg"] for m, b, row in before_rows}
    fig, ax = plt.subplots(figsize=(max(6.4, 0.55 * len(labels)), 4.0), dpi=110)
    xs = range(len(labels))
    ax.bar(
        [x - 0.2 for x in xs], [before.get((m, b), 0.0) for m, b, _ in after_rows], width=0.4, label="before recovery"
    )
    ax.bar([x + 0.2 for x in xs], [row["avg"] for _, _, row in after_rows], width=0.4, label="after recovery")
    ax.set_xticks(list(xs), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("average accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(_save(fig, out_dir / "recovery.png"))
    plt.close(fig)
    return paths


def write_outputs(cells: Sequence[dict[str, Any]], out_dir: str | Path, split: str) -> list[Path]:
    out_dir = Path(out_dir)
    results = out_dir / "results.json"
    _atomic_text(results, json.dumps({"split": split, "cells": list(cells)}, indent=1) + "\n")
    md = out_dir / "results.md"
    _atomic_text(md, markdown(cells, split))
    return [results, md, *(plot(cells, out_dir) if cells else [])]


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)
    return path


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
