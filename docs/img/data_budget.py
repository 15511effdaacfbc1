"""Draws docs/img/data_budget.png from numbers in docs/accuracy.md (no new measurement).

The data budget: a pruned model's accuracy after recovery minus the dense model's, after the same
recovery fine-tune on the same training rows, against the number of rows, with 95% paired-bootstrap
intervals. A line that reaches 0 is a pruned model that caught up. (`benchmarks/data_budget.py` draws
accuracy itself from the `gradprune eval` cells; the 3,200-row HellaSwag cells of an earlier session
were not kept, so this figure is drawn from the documented numbers.)
Run: python docs/img/data_budget.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# series -> [(training rows, val (diff, low, high), test (diff, low, high))], copied from docs/accuracy.md.
GAPS = {
    "SmolLM2-135M, HellaSwag, 6 of 30": [
        (200, (-7.0, -13.5, -0.5), (-9.0, -14.0, -4.0)),
        (800, (-8.5, -14.0, -3.0), (-9.7, -14.3, -5.0)),
        (3200, (-9.0, -15.0, -3.5), (-7.7, -12.3, -3.0)),
    ],
    "Gemma 3 270M, PIQA, 4 of 18 (all 771 rows at 800)": [
        (200, (-6.0, -12.5, 0.5), (-4.3, -9.0, 0.3)),
        (771, (-3.5, -9.5, 2.0), (-3.7, -8.3, 1.0)),
    ],
}


def main() -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    rows = [200, 800, 3200]  # PIQA's 771 sits next to 800
    for column, (ax, split) in enumerate(zip(axes, ("val", "test"))):
        for offset, (name, series) in enumerate(GAPS.items()):
            xs = [n * (1.06**offset) for n, *_ in series]  # side by side, not on top of each other
            cells = [split_cells[column] for _, *split_cells in series]
            ys = [c[0] for c in cells]
            errors = [[c[0] - c[1] for c in cells], [c[2] - c[0] for c in cells]]
            ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=name)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xticks(rows, [f"{n:,}" for n in rows])
        ax.minorticks_off()
        ax.set_xlabel("training rows (one epoch of LoRA r=8)")
        ax.set_title(f"{split}: pruned minus dense after recovery")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy points vs dense (95% CI)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out = Path(__file__).with_name("data_budget.png")
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(main())
