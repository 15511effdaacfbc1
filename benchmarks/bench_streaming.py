"""Peak host memory of the streaming surgery on a big checkpoint built on disk with random bf16 weights.

Writes a Llama-3.1-8B- or 70B-shaped safetensors checkpoint one layer at a time (the model is never
whole in memory), then prunes it with ``streaming.stream_prune`` (the paper's 13 of 32 / 32 of 80
layers, 3 / 8 merged, an IGIA matrix of random values per merged linear) in a child process and
prints the growth of that process's peak resident memory next to the sizes of one layer and of
the whole model.

    python benchmarks/bench_streaming.py --shape 8b --dir /tmp/llama8b   (16 GB of disk; 70b: 141 GB)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, remove=13, merge=3),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256, remove=32, merge=8),
}  # fmt: skip

CHILD = """
import sys, time, torch
from swift_gradpruner.config import GradPruneConfig
from swift_gradpruner.selection import plan_removal
from swift_gradpruner.streaming import stream_prune
from transformers import AutoConfig, LlamaConfig  # imported before the peak is reset: not the surgery's memory
base, out, layers, remove, merge = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
removed = list(range(layers - remove - 1, layers - 1))  # a block before the last layer, as IGIA tends to pick
plan = plan_removal(layers, removed, merge, [float(j) for j in range(layers)])
config = GradPruneConfig(prune_layers=remove, merge_layers=merge, score="squared")
gen = torch.Generator().manual_seed(0)
SHAPE = {k: tuple(v) for k, v in __import__("json").loads(sys.argv[6]).items()}
def igia(name):  # F of a removed layer's linear, rebuilt in float64 as accumulator.igia does
    return torch.rand(*SHAPE[name.split(".", 3)[3]], generator=gen, dtype=torch.float64)
status = lambda key: int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(key)))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before, start = status("VmRSS:"), time.perf_counter()
stream_prune(base, out, plan, igia, config)
print(status("VmHWM:") - before, time.perf_counter() - start)
"""


def build(folder: Path, shape: dict) -> tuple[int, int, dict]:
    """Write the checkpoint layer by layer; returns (bytes of one layer, bytes in all, linear shapes)."""
    h, f, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_key_value_heads"]
    head = h // shape["num_attention_heads"]
    linears = {
        "self_attn.q_proj": (h, h), "self_attn.k_proj": (kv * head, h), "self_attn.v_proj": (kv * head, h),
        "self_attn.o_proj": (h, h), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f),
    }  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    weight_map, total, layer_bytes = {}, 0, 0

    def shard(name: str, tensors: dict) -> None:
        nonlocal total
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * 2 for t in tensors.values())

    def rand(*size):
        return (torch.randn(*size, generator=gen) * 0.02).to(torch.bfloat16)

    shard("embed.safetensors", {"model.embed_tokens.weight": rand(shape["vocab_size"], h)})
    for j in range(shape["num_hidden_layers"]):
        tensors = {f"model.layers.{j}.{k}.weight": rand(*s) for k, s in linears.items()}
        tensors[f"model.layers.{j}.input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        tensors[f"model.layers.{j}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        layer_bytes = sum(t.numel() * 2 for t in tensors.values())
        shard(f"layer-{j:03d}.safetensors", tensors)
        print(f"\rwriting layer {j + 1}/{shape['num_hidden_layers']}", end="", flush=True)
    shard("head.safetensors", {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
                               "lm_head.weight": rand(shape["vocab_size"], h)})  # fmt: skip
    print()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {k: v for k, v in shape.items() if k not in ("remove", "merge")}
    config.update(model_type="llama", architectures=["LlamaForCausalLM"], torch_dtype="bfloat16", head_dim=head,
                  max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False)  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return layer_bytes, total, {k: list(s) for k, s in linears.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="8b")
    parser.add_argument("--dir", required=True, help="scratch folder (removed afterwards unless --keep)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    shape, root = SHAPES[args.shape], Path(args.dir)
    start = time.perf_counter()
    layer_bytes, total, linears = build(root / "dense", shape)
    print(f"built a Llama-3.1-{args.shape.upper()}-shaped bf16 checkpoint: {total / 2**30:.1f} GiB, "
          f"{layer_bytes / 2**20:.0f} MiB per decoder layer ({time.perf_counter() - start:.0f} s)")  # fmt: skip
    try:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(root / "dense"), str(root / "pruned"), str(shape["num_hidden_layers"]),
             str(shape["remove"]), str(shape["merge"]), json.dumps(linears)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        grown_kib, seconds = proc.stdout.split()[-2:]
        grown = int(grown_kib) * 1024
        print(f"streaming surgery ({shape['remove']} of {shape['num_hidden_layers']} layers removed, "
              f"{shape['merge']} merged): {float(seconds):.0f} s, peak resident memory grew by "
              f"{grown / 2**30:.2f} GiB = {grown / layer_bytes:.2f} layers = {grown / total:.1%} of the "
              "model")  # fmt: skip
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
