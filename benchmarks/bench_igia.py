"""IGIA accumulator vs naive per-step materialisation of dB.dA, on Llama-3.1-8B-shaped LoRA factors.

Both sides are measured in this one run, on the same random gradients (r=8, 32 layers x 7 linears,
CPU). The naive side materialises G = gB @ gA for every linear and squares it (Eq. 2-3 as
written); keeping its running F would need 4 bytes per parameter (28 GB), which this machine cannot
hold, so its time excludes that memory and its F size is reported instead. Each side runs in a
child process so that its peak RSS is its own.

A third side, "spill", is what a swift run does: the factors go to disk step by step (one
safetensors file per step) while the steps are made on the fly, so ``--spill-steps 500`` shows
host RAM and disk for a long phase 1 (t = 500), and the time to rebuild one layer's F from disk.

    python benchmarks/bench_igia.py [--steps 3] [--layers 32] [--rank 8] [--spill-steps 500]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from swift_gradpruner.tiny import llama_linear_shapes

SHAPES = llama_linear_shapes(hidden=4096, kv=1024, ffn=14336)  # Llama-3.1-8B


def make_step(layers: int, rank: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        f"model.layers.{j}.{suffix}": (
            torch.randn(rank, n, generator=gen) * 1e-3,
            torch.randn(m, rank, generator=gen) * 1e-3,
        )
        for j in range(layers)
        for suffix, (m, n) in SHAPES.items()
    }


def run_side(side: str, steps: int, layers: int, rank: int) -> dict:
    from swift_gradpruner.importance import IGIAAccumulator

    if side == "spill":
        return run_spill(steps, layers, rank)
    grads = [make_step(layers, rank, seed) for seed in range(steps)]
    base_rss = _rss_mb()
    times = []
    if side == "accumulator":
        acc = IGIAAccumulator()
        for g in grads:
            start = time.perf_counter()
            acc.update(g)
            times.append(time.perf_counter() - start)
        extra = {"factor_bytes_per_step": acc.factor_bytes // steps, "peak_rss_mb": _rss_mb()}
        # Rebuild F for the linears of one layer, as the merge of one layer needs.
        start = time.perf_counter()
        for suffix in SHAPES:
            acc.igia(f"model.layers.0.{suffix}")
        extra["igia_one_layer_s"] = time.perf_counter() - start
    else:
        for g in grads:
            start = time.perf_counter()
            total = 0.0
            for grad_a, grad_b in g.values():
                sim = grad_b @ grad_a
                total += float((sim * sim).sum())
            times.append(time.perf_counter() - start)
        extra = {}
    return {"step_s": min(times), "peak_rss_mb": _rss_mb(), "base_rss_mb": base_rss, **extra}


def run_spill(steps: int, layers: int, rank: int) -> dict:
    """Factors written to disk as steps arrive (steps made one at a time, never all in RAM)."""
    import shutil
    import tempfile

    from swift_gradpruner.importance import IGIAAccumulator

    folder = tempfile.mkdtemp(prefix="bench_igia_spill_")
    try:
        base_rss = _rss_mb()
        acc = IGIAAccumulator(factor_dir=folder)
        update_s = 0.0
        for seed in range(steps):
            grads = make_step(layers, rank, seed)
            start = time.perf_counter()
            acc.update(grads)
            update_s += time.perf_counter() - start
            del grads
        after_steps = _rss_mb()
        start = time.perf_counter()
        for suffix in SHAPES:
            acc.igia(f"model.layers.0.{suffix}")
        return {"update_s": update_s / steps, "disk_bytes": acc.factor_disk_bytes, "base_rss_mb": base_rss,
                "rss_after_steps_mb": after_steps, "peak_rss_mb": _rss_mb(),
                "igia_one_layer_s": time.perf_counter() - start}  # fmt: skip
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--spill-steps", type=int, default=0, help="also run the spill-to-disk side for this t")
    parser.add_argument("--side", choices=["accumulator", "naive", "spill"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.steps, args.layers, args.rank)))
        return
    results = {}
    for side in ("accumulator", "naive"):
        cmd = [
            sys.executable,
            __file__,
            "--side",
            side,
            "--steps",
            str(args.steps),
            "--layers",
            str(args.layers),
            "--rank",
            str(args.rank),
        ]
        results[side] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    params = args.layers * sum(m * n for m, n in SHAPES.values())
    acc, naive = results["accumulator"], results["naive"]
    print(
        f"Llama-3.1-8B-shaped LoRA factors: {args.layers} layers x 7 linears, r={args.rank}, "
        f"{params / 1e9:.2f}B adapted weights, {torch.get_num_threads()} threads, best of {args.steps} steps"
    )
    print(f"  accumulator step : {acc['step_s'] * 1e3:9.1f} ms  (Gram trick + CPU copy of the factors)")
    print(f"  naive step       : {naive['step_s'] * 1e3:9.1f} ms  (materialise and square dB.dA)")
    print(f"  speed-up         : {naive['step_s'] / acc['step_s']:9.1f} x")
    print(
        f"  factor store     : {acc['factor_bytes_per_step'] / 2**20:9.1f} MiB per step "
        f"(naive running F: {4 * params / 2**30:.1f} GiB fp32)"
    )
    print(
        f"  peak RSS growth  : accumulator {acc['peak_rss_mb'] - acc['base_rss_mb']:.0f} MiB, "
        f"naive {naive['peak_rss_mb'] - naive['base_rss_mb']:.0f} MiB (without F)"
    )
    print(f"  F rebuild        : {acc['igia_one_layer_s']:9.2f} s for one layer's 7 linears, {args.steps} steps")
    if args.spill_steps:
        cmd = [sys.executable, __file__, "--side", "spill", "--steps", str(args.spill_steps), "--layers",
               str(args.layers), "--rank", str(args.rank)]  # fmt: skip
        spill = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        print(f"  spill to disk, t = {args.spill_steps} (what a swift run does):")
        print(f"    update          : {spill['update_s'] * 1e3:9.1f} ms per step (Gram trick + writing the step file)")
        print(f"    disk            : {spill['disk_bytes'] / 2**30:9.1f} GiB of factor files")
        print(
            f"    host RAM        : {spill['rss_after_steps_mb'] - spill['base_rss_mb']:9.0f} MiB growth after "
            f"{args.spill_steps} steps, {spill['peak_rss_mb'] - spill['base_rss_mb']:.0f} MiB at peak (F rebuild)"
        )
        print(f"    F rebuild       : {spill['igia_one_layer_s']:9.1f} s for one layer's 7 linears from disk")


if __name__ == "__main__":
    main()
