"""bench.json, bench.md (the paper's Table 2 shape: pruned as % of dense) and bench.png, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

# The paper's goals (issue 10): pruned/dense time within these factors of the remaining-FLOP fraction.
DECODE_GOAL, TRAIN_GOAL = 1.03, 1.05


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _flop(n: float) -> str:
    return f"{n / 1e9:.3g} GFLOP" if n >= 1e9 else f"{n / 1e6:.3g} MFLOP"


def columns(results: dict) -> list[tuple[str, float, str, bool]]:
    """(column, pruned/dense ratio, dense value in words, trusted) in Table 2's order."""
    counts = results["counts"]
    dense, pruned = counts["dense"], counts["pruned"]
    cols = [
        ("Parameters", pruned["parameters"] / dense["parameters"], f"{dense['parameters'] / 1e6:.1f}M", True),
        ("FLOPs/token", pruned["flops_per_token"] / dense["flops_per_token"],
         f"{_flop(dense['flops_per_token'])} at {counts['flops_context']} tokens", True),
    ]  # fmt: skip
    for mode, entry in results["training"].items():
        if "skipped" in entry:
            continue
        cols.append((f"Train time ({mode})", entry["ratio"], f"{entry['dense']['median'] * 1e3:.0f} ms/step",
                     entry["trusted"]))  # fmt: skip
        cols.append((f"Train memory ({mode})", entry["memory_ratio"],
                     _size(entry["peak_memory_bytes"]["dense"]), True))  # fmt: skip
    for name, entry in results["inference"]["workloads"].items():
        w = entry["workload"]
        unit = "ms/request" if w["batch"] == 1 and name == "latency" else "tok/s"
        value = entry["dense"]["median"] * 1e3 if unit == "ms/request" else entry["dense_tokens_per_s"]
        cols.append((f"Inference time ({name})", entry["ratio"], f"{value:.1f} {unit}", entry["trusted"]))
    decode = results["inference"]["workloads"].get("decode")
    if decode:
        w = decode["workload"]
        tokens = w["batch"] * (w["prompt_tokens"] + w["new_tokens"])
        need = {k: counts[k]["weight_bytes"] + counts[k]["kv_bytes_per_token"] * tokens for k in ("dense", "pruned")}
        cols.append(("Inference memory", need["pruned"] / need["dense"], _size(need["dense"]), True))
    return cols


def markdown(results: dict) -> str:
    cols = columns(results)
    counts = results["counts"]
    lines = [
        f"# gradprune bench: {counts['dense']['layers']} -> {counts['pruned']['layers']} layers",
        "",
        f"{results['device']}, {results['dtype']}, inference backend {results['inference']['backend']}; "
        f"medians of {results['settings']['rounds']} alternating dense/pruned rounds after a warm-up. "
        "Pruned as % of dense (lower is better); the dense row gives the absolute value.",
        "",
        "| Model | " + " | ".join(c[0] for c in cols) + " |",
        "|---|" + "---|" * len(cols),
        "| Dense | " + " | ".join(f"100% ({c[2]})" for c in cols) + " |",
        "| Pruned | " + " | ".join(f"{c[1]:.1%}" + ("" if c[3] else " (unreliable)") for c in cols) + " |",
        "",
    ]
    fraction = counts["pruned"]["flops_per_token"] / counts["dense"]["flops_per_token"]
    lines.append(f"Remaining-FLOP fraction {fraction:.3f}. Goals: decode time <= {DECODE_GOAL} x it "
                 f"({DECODE_GOAL * fraction:.3f}), training step time <= {TRAIN_GOAL} x it "
                 f"({TRAIN_GOAL * fraction:.3f}).")  # fmt: skip
    details = list(results["training"].values()) + list(results["inference"]["workloads"].values())
    for entry in details:
        if "text" in entry:
            lines.append(f"- {entry['text']}")
    decode = results["inference"]["workloads"].get("decode")
    if decode:
        lines.append(f"- decode goal {'met' if decode['ratio'] <= DECODE_GOAL * fraction else 'NOT met'}")
    for mode, entry in results["training"].items():
        if "skipped" in entry:
            lines.append(f"- training ({mode}) skipped: {entry['skipped']}")
        else:
            lines.append(f"- {mode} training goal {'met' if entry['ratio'] <= TRAIN_GOAL * fraction else 'NOT met'}; "
                         f"memory measured by {entry['memory_measured_by']}")  # fmt: skip
    lines += [
        "",
        f"Training: {results['trainer_path']}; batch {results['settings']['batch']} x {results['settings']['seq']} "
        "tokens. Inference memory: weights + KV cache of the decode workload (analytic; vLLM preallocates "
        "its cache, so its own peak says nothing about the model). Workloads: "
        + "; ".join(f"{w['name']} {w['batch']} x ({w['prompt_tokens']} prompt + {w['new_tokens']} new)"
                    for w in results["settings"]["workloads"]) + ".",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = columns(results)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(cols)), 3.8), dpi=110)
    colours = ["tab:gray" if i < 2 else ("tab:blue" if c[3] else "tab:red") for i, c in enumerate(cols)]
    ax.bar(range(len(cols)), [100 * c[1] for c in cols], color=colours)
    ax.axhline(100, color="black", linewidth=0.8)
    ax.set_xticks(range(len(cols)), [c[0] for c in cols], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("pruned, % of dense")
    ax.set_title(f"{results['counts']['dense']['layers']} -> {results['counts']['pruned']['layers']} layers on "
                 f"{results['device']}", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(results: dict, output: str | os.PathLike) -> list[Path]:
    """Write the three files, each to a temporary name first and then renamed."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    writers = {
        "bench.json": lambda p: p.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8"),
        "bench.md": lambda p: p.write_text(markdown(results), encoding="utf-8"),
        "bench.png": lambda p: plot(results, p),
    }
    paths = []
    for name, write in writers.items():
        tmp = out / f".{name}.tmp{Path(name).suffix}"
        write(tmp)
        os.replace(tmp, out / name)
        paths.append(out / name)
    return paths
