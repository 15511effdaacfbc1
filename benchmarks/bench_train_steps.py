"""Phase-1 capture overhead of GradPruner, measured side by side in one run on one Llama-shaped model.

LoRA (r=8, all linears) optimizer steps with and without the per-step IGIA capture (reading every
gA/gB, the Gram-trick update and the CPU copy of the factors, i.e. what IGIACaptureCallback does),
interleaved step by step. Goal: ratio <= 1.05. (Phase-2 speed, dense vs pruned: `gradprune bench`.)

    python benchmarks/bench_train_steps.py [--hidden 256] [--layers 32] [--seq 128] [--batch 8] [--steps 8]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from swift_gradpruner.capture import lora_pairs, read_lora_grads
from swift_gradpruner.importance import IGIAAccumulator
from swift_gradpruner.tiny import build_model


def timed_step(model, optimizer, batch, after_backward=None) -> float:
    start = time.perf_counter()
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    if after_backward is not None:
        after_backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def lora(model, rank=8):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=32, target_modules="all-linear"))
    for layer in peft_model.base_model.model.model.layers:  # B != 0 so that gA is not trivially zero
        for module in layer.modules():
            if hasattr(module, "lora_B"):
                torch.nn.init.normal_(module.lora_B["default"].weight, std=1e-3)
    return peft_model


def optimizer_of(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def interleave(runs: dict, steps: int) -> dict[str, float]:
    """Median step time of each (model, optimizer, hook) in ``runs``, alternating between them."""
    times = {name: [] for name in runs}
    for i in range(steps + 2):
        for name, (model, optimizer, batch, hook) in runs.items():
            elapsed = timed_step(model, optimizer, batch, hook)
            if i >= 2:  # warm-up
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    shape = dict(hidden=args.hidden, heads=8, kv_heads=2, intermediate=int(args.hidden * 2.6875))
    dense = build_model("llama", args.layers, vocab_size=2048, **shape)
    batch = torch.randint(2048, (args.batch, args.seq))
    print(f"Llama-shaped model: {args.layers} layers, hidden {args.hidden}, "
          f"{sum(p.numel() for p in dense.parameters()) / 1e6:.1f}M parameters; batch {args.batch} x {args.seq} "
          f"tokens; {torch.get_num_threads()} threads; median of {args.steps} interleaved steps")  # fmt: skip

    model = lora(copy.deepcopy(dense))
    pairs, accumulator = lora_pairs(model), IGIAAccumulator()
    optimizer = optimizer_of(model)

    def capture():
        accumulator.update(read_lora_grads(pairs))

    t = interleave({"capture": (model, optimizer, batch, capture), "plain": (model, optimizer, batch, None)},
                   args.steps)  # fmt: skip
    print(
        f"phase 1 (LoRA r=8): step with capture {t['capture'] * 1e3:.1f} ms, without {t['plain'] * 1e3:.1f} ms, "
        f"ratio {t['capture'] / t['plain']:.3f} (goal <= 1.05); {len(pairs)} linears, "
        f"{accumulator.factor_bytes / max(accumulator.counts.used, 1) / 2**20:.2f} MiB of factors per step"
    )


if __name__ == "__main__":
    main()
