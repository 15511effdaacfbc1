"""Draws docs/img/accuracy_vs_dense.png from numbers in docs/accuracy.md (no new measurement).

The chat-row sweep on SmolLM2-135M: accuracy after the recovery fine-tune minus dense, pooled over the
four tasks every plotted row has (ARC-Easy, HellaSwag, PIQA, SST-2), with 95% paired-bootstrap intervals.
Run: python docs/img/accuracy_vs_dense.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# (layers removed of 30, val (diff, low, high), test (diff, low, high)), copied from docs/accuracy.md.
BLOCK_INFLUENCE = [
    (2, (-7.3, -10.4, -4.2), (-9.3, -11.5, -7.0)),
    (3, (-5.9, -8.8, -3.0), (-7.7, -10.2, -5.3)),
    (6, (-7.0, -10.2, -3.7), (-10.2, -12.9, -7.4)),
    (12, (-16.6, -20.8, -12.4), (-16.2, -19.4, -12.9)),
]
OTHERS_AT_6 = {
    "skip_loss": ((-7.4, -11.0, -3.7), (-10.3, -13.1, -7.4)),
    "igia (paper)": ((-19.1, -23.6, -14.6), (-18.0, -21.4, -14.6)),
    "angular": ((-21.6, -26.0, -17.2), (-20.9, -24.3, -17.5)),
    "last-N": ((-20.9, -25.6, -16.3), (-16.9, -20.2, -13.5)),
    "random": ((-20.4, -25.4, -15.5), (-22.0, -25.5, -18.5)),
}


def _bar(ax, x, cell, **kw):
    diff, low, high = cell
    ax.errorbar([x], [diff], yerr=[[diff - low], [high - diff]], capsize=3, **kw)


def main() -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for column, (ax, split) in enumerate(zip(axes, ("val", "test"))):
        xs = [n for n, *_ in BLOCK_INFLUENCE]
        ys = [cells[column][0] for _, *cells in BLOCK_INFLUENCE]
        ax.plot(xs, ys, color="C0", label="block_influence (default)")
        for n, *cells in BLOCK_INFLUENCE:
            _bar(ax, n, cells[column], color="C0", fmt="o")
        for i, (name, cells) in enumerate(OTHERS_AT_6.items()):
            _bar(ax, 6 + 0.35 * (i + 1), cells[column], color=f"C{i + 1}", fmt="s", label=name)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(f"{split}: accuracy after recovery minus dense")
        ax.set_xlabel("decoder layers removed (of 30)")
        ax.set_xticks([2, 3, 6, 12])
    axes[0].set_ylabel("points (95% CI)")
    axes[1].legend(fontsize=7, loc="upper right")
    fig.suptitle("SmolLM2-135M, chat rows, ARC-E + HellaSwag + PIQA + SST-2 pooled (2-core CPU)", fontsize=9)
    fig.tight_layout()
    out = Path(__file__).with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(main())
