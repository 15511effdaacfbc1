"""Whole-run cost of GradPruner: a dense `swift sft` against `swift sft --gradprune true`, same data and
settings, in alternating rounds (dense, pruned, pruned, dense, ...), each in a fresh output folder (no
reuse). Prints each run's wall time, the median ratio pruned-run / dense-run, the per-stage costs
from the GradPruner run's report (``whole_run``) and that run's own estimate of the dense run.

    python benchmarks/bench_whole_run.py --model ~/.cache/swift_gradpruner/models/smollm2 --rows 600
    python benchmarks/bench_whole_run.py ... --gradprune "--gradprune_score block_influence"

The model must be a local Llama checkpoint (`gradprune models smollm2` converts SmolLM2-135M); the
data are the tiny chat rows of swift_gradpruner.tiny (offline).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import time
from pathlib import Path

from swift_gradpruner.demo import offline_env, swift_command
from swift_gradpruner.tiny import write_dataset


def run(args: list[str], log: Path) -> float:
    """Wall seconds of ``swift <args>``; stops the benchmark with the log's tail if it fails."""
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.call([*swift_command(), *args], env=offline_env(), stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"swift failed (exit {code}); see {log}:\n" + "".join(log.read_text().splitlines(True)[-20:]))
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local Llama checkpoint folder")
    parser.add_argument("--rows", type=int, default=600, help="training rows (default: %(default)s)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2, help="pairs of runs, ABBA order (default: %(default)s)")
    parser.add_argument("--gradprune", default="", help="extra --gradprune_* flags, one string")
    parser.add_argument("--output", default="bench_whole_run", help="working folder (default: %(default)s)")
    args = parser.parse_args()
    root = Path(args.output).resolve()
    root.mkdir(parents=True, exist_ok=True)
    data = write_dataset(root / "train.jsonl", args.rows, seed=0)
    common = ["sft", "--model", str(Path(args.model).expanduser()), "--model_type", "llama", "--template", "chatml",
              "--dataset", str(data), "--tuner_type", "lora", "--num_train_epochs", str(args.epochs),
              "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--max_length", "256",
              "--torch_dtype", "float32", "--fp16", "false", "--save_strategy", "no", "--report_to", "none",
              "--check_model", "false", "--dataloader_num_workers", "0", "--logging_steps", "10",
              "--add_version", "false", "--seed", "42"]  # fmt: skip
    extra = ["--gradprune", "true", *shlex.split(args.gradprune)]
    times: dict[str, list[float]] = {"dense": [], "gradprune": []}
    reports = []
    order = [
        kind for r in range(args.rounds) for kind in (("dense", "gradprune") if r % 2 == 0 else ("gradprune", "dense"))
    ]
    for i, kind in enumerate(order):
        out = root / f"{i:02d}-{kind}"
        flags = extra if kind == "gradprune" else []
        seconds = run([*common, *flags, "--output_dir", str(out)], root / f"{i:02d}-{kind}.log")
        times[kind].append(seconds)
        print(f"[bench] run {i + 1}/{len(order)} {kind}: {seconds:.0f} s", flush=True)
        if kind == "gradprune":
            reports.append(json.loads((out / "gradprune" / "model" / "gradprune_report.json").read_text()))
    pairs = [g / d for g, d in zip(times["gradprune"], times["dense"])]
    whole = reports[-1]["whole_run"]
    settings = {"model": args.model, "rows": args.rows, "epochs": args.epochs, "gradprune": extra}
    removed = reports[-1]["num_layers_before"] - reports[-1]["num_layers_after"]
    result = {"times_s": times, "ratio": statistics.median(pairs), "ratios": pairs, "whole_run": whole,
              "removed_layers": removed, "settings": settings}  # fmt: skip
    (root / "bench_whole_run.json").write_text(json.dumps(result, indent=1) + "\n")
    dense, pruned = (", ".join(f"{t:.0f}" for t in times[kind]) for kind in ("dense", "gradprune"))
    print(f"[bench] dense runs {dense} s; GradPruner runs {pruned} s ({removed} layers removed)")
    per_pair = ", ".join(f"{r:.2f}" for r in pairs)
    print(f"[bench] whole GradPruner run / dense run: {result['ratio']:.2f} (per pair {per_pair})")
    estimate = f"{whole['ratio']:.2f} x an estimated dense run of {whole['dense_estimate_s']:.0f} s"
    print(f"[bench] the GradPruner run's own estimate: {estimate}")
    for stage, seconds in whole["stages_s"].items():
        print(f"[bench]   {stage}: {seconds:.1f} s")
    print(f"[bench]   phase 2: {whole['phase2_s']:.1f} s (training {whole['phase2_train_s']:.1f} s, step ratio "
          f"{whole['step_ratio']:.2f}, {whole['ratio_source']})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
