"""Helpers of scripts/gpu_check.sh (run there, on a machine with a CUDA GPU).

    python scripts/gpu_check.py build OUT        # Llama-3.1-8B-shaped random bf16 model + a 13-of-32 pruned copy
    python scripts/gpu_check.py criterion OUT    # the default criterion's time and peak memory at 4k tokens,
                                                 # and the prune step's device plan for that model
    python scripts/gpu_check.py summary OUT      # OUT/gpu_check.json and OUT/gpu_check.md from the steps' files

Every step writes OUT/<step>.json, so the summary shows what ran, what failed and what was skipped.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

LLAMA_8B = dict(hidden=4096, heads=32, kv_heads=8, intermediate=14336, num_layers=32, vocab_size=128256)
REMOVE = 13  # the paper's 13 of Llama-3.1-8B's 32 layers
STEPS = ("install", "test_gpu", "build", "bench", "criterion", "swift_smollm2")


def build(out: Path) -> dict:
    """A random Llama with Llama-3.1-8B's shapes in bf16 (built on the GPU, saved in shards), and the same
    checkpoint with 13 of its 32 layers removed by the streaming surgery (the last 13 before the final
    one: which layers does not matter for timing)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from swift_gradpruner.config import GradPruneConfig
    from swift_gradpruner.criteria import last_layers
    from swift_gradpruner.selection import plan_removal
    from swift_gradpruner.streaming import stream_prune
    from swift_gradpruner.tiny import build_tokenizer

    start = time.perf_counter()
    shape = LLAMA_8B
    config = AutoConfig.for_model(
        "llama", vocab_size=shape["vocab_size"], hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"], num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"], max_position_embeddings=8192,
        rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=None, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    dense, pruned = out / "llama8b_dense", out / "llama8b_pruned"
    model.save_pretrained(dense, max_shard_size="4GB")
    build_tokenizer().save_pretrained(dense)  # any tokenizer: the benchmark feeds random token ids
    del model
    torch.cuda.empty_cache()
    built = time.perf_counter() - start
    plan = plan_removal(shape["num_layers"], last_layers(shape["num_layers"], REMOVE), 0, [0.0] * shape["num_layers"])
    stream_prune(dense, pruned, plan, lambda name: None, GradPruneConfig(prune_layers=REMOVE, merge_layers=0,
                 score="last"), overwrite=True)  # fmt: skip
    pruned_s = time.perf_counter() - start - built
    return {"dense": str(dense), "pruned": str(pruned), "build_s": built, "prune_s": pruned_s, "removed": REMOVE,
            "layers": shape["num_layers"]}  # fmt: skip


def criterion(out: Path, rows: int = 4, tokens: int = 4096) -> dict:
    """The default criterion choosing 13 of 32 layers of the 8B-shaped model on ``rows`` x ``tokens``
    calibration tokens: seconds and peak CUDA memory above the model itself."""
    import torch
    from transformers import AutoModelForCausalLM

    from swift_gradpruner.config import GradPruneConfig
    from swift_gradpruner.criteria import removed_layers

    config = GradPruneConfig()
    model = AutoModelForCausalLM.from_pretrained(out / "llama8b_dense", dtype=torch.bfloat16, device_map="cuda").eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (rows, tokens), generator=gen)
    labels = ids.clone()
    labels[:, : tokens // 2] = -100
    batches = [{"input_ids": ids[i : i + 1], "attention_mask": torch.ones_like(ids[i : i + 1]),
                "labels": labels[i : i + 1]} for i in range(rows)]  # fmt: skip
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        removed, _ = removed_layers(model, config.score, REMOVE, batches, {})
    except torch.OutOfMemoryError as error:
        return {"criterion": config.score, "error": f"out of GPU memory: {str(error).splitlines()[0]}"}
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - weights) / 2**30
    del model
    torch.cuda.empty_cache()
    from swift_gradpruner.checkpoint import _device_plan

    return {"criterion": config.score, "rows": rows, "tokens_per_row": tokens, "seconds": seconds,
            "peak_gib_above_weights": peak, "weights_gib": weights / 2**30, "removed": removed,
            "device_plan": _device_plan(out / "llama8b_dense").describe()}  # fmt: skip


def summary(out: Path) -> dict:
    """One JSON and one Markdown table from the steps' files (missing = not run)."""
    import torch

    results = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "torch": torch.__version__}  # fmt: skip
    for step in STEPS:
        path = out / f"{step}.json"
        results[step] = json.loads(path.read_text()) if path.is_file() else {"status": "not run"}
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [f"# GPU check: {results['gpu']} (torch {results['torch']})", "", "| step | result |", "|---|---|"]
    for step in STEPS:
        row = results[step]
        text = "; ".join(f"{k}: {_short(v)}" for k, v in row.items() if k not in ("dense", "pruned"))
        lines.append(f"| {step} | {text} |")
    bench = out / "bench" / "bench.md"
    if bench.is_file():
        lines += ["", "## gradprune bench: Llama-3.1-8B shapes, 13 of 32 layers removed, bf16", "", bench.read_text()]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    return results


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    text = str(value)
    return text if len(text) < 200 else text[:197] + "..."


def main(argv: list[str]) -> int:
    step, out = argv[0], Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    if step == "summary":
        print((out / "gpu_check.md").read_text() if summary(out) else "")
        return 0
    start = time.perf_counter()
    try:
        result = {"status": "ok", **{"build": build, "criterion": criterion}[step](out)}
    except Exception as error:  # recorded in the summary; the script goes on with the next step
        result = {"status": "failed", "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
    result["wall_s"] = time.perf_counter() - start
    (out / f"{step}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
