"""gradprune_report.json and the layer-score bar plot written beside a pruned checkpoint."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPORT_NAME = "gradprune_report.json"
PLOT_NAME = "gradprune_layer_scores.png"


def write_json(path: Path, report: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_report(checkpoint_dir: str | Path) -> dict[str, Any] | None:
    """The report of a pruned checkpoint, or None if it has none."""
    path = Path(checkpoint_dir) / REPORT_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def update_report(checkpoint_dir: str | Path, **entries: Any) -> None:
    """Set entries of a pruned checkpoint's report; a new file renamed over the old one, so a hard-linked copy
    of the same model elsewhere keeps its own report and a crash leaves the old one whole."""
    path = Path(checkpoint_dir) / REPORT_NAME
    report = json.loads(path.read_text(encoding="utf-8"))
    report.update(entries)
    tmp = path.with_name(f".{REPORT_NAME}.tmp")
    write_json(tmp, report)
    os.replace(tmp, path)


def plotted_scores(report: Mapping[str, Any]) -> tuple[list[float], str]:
    """One value per layer for the plot, and its label: what the criterion measured per layer (KL or loss
    after removing that layer alone, Block Influence), else the IGIA layer scores (Eq. 4)."""
    criterion = report.get("criterion", {})
    for key, label in (("kl_removing_one_layer", "KL from the dense model after removing this layer alone"),
                       ("loss_removing_one_layer", "loss after removing this layer alone"),
                       ("block_influence", "Block Influence (1 - cos)")):  # fmt: skip
        values = criterion.get(key)
        if values and all(v is not None for v in values):
            return list(values), label
    return list(report["layer_scores"]), f"IGIA layer score ({report['config']['score']})"


def plot_layer_scores(path: Path, report: Mapping[str, Any]) -> None:
    """Bar plot of per-layer values (log scale): kept, dropped and merged layers in three colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores, label = plotted_scores(report)
    dropped = set(report["dropped_layers"])
    merged = {int(k): v for k, v in report["merged_layers"].items()}
    colours, labels = [], {}
    for j in range(len(scores)):
        if j in merged:
            colours.append("tab:orange")
            labels["tab:orange"] = "removed, merged into the preceding retained layer"
        elif j in dropped:
            colours.append("tab:red")
            labels["tab:red"] = "removed"
        else:
            colours.append("tab:blue")
            labels["tab:blue"] = "kept"
    positive = [s for s in scores if s > 0]
    floor = min(positive) / 10 if positive else 1.0
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(scores)), 3.6), dpi=110)
    ax.bar(range(len(scores)), [max(s, floor) for s in scores], color=colours)
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(label, fontsize=8)
    ax.set_title(f"GradPruner: {len(dropped) + len(merged)} of {len(scores)} layers removed, {len(merged)} merged")
    for j, target in merged.items():
        ax.annotate(f"\u2192{target}", (j, max(scores[j], floor)), ha="center", va="bottom", fontsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in labels]
    ax.legend(handles, list(labels.values()), fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
