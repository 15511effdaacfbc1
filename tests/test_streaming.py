"""Streaming surgery (streaming.py) writes the same checkpoint as the in-memory path, bit for bit,
while holding about one layer in memory instead of the whole model."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import random_lora_grads, tensors_of
from swift_gradpruner.checkpoint import prune_checkpoint
from swift_gradpruner.config import GradPruneConfig
from swift_gradpruner.importance import IGIAAccumulator
from swift_gradpruner.merge import merge_removed_layers
from swift_gradpruner.report import PLOT_NAME, REPORT_NAME
from swift_gradpruner.selection import plan_removal
from swift_gradpruner.streaming import INDEX_NAME, stream_prune, weight_files
from swift_gradpruner.surgery import remove_layers, save_checkpoint
from swift_gradpruner.tiny import build_model, build_tokenizer


@pytest.mark.parametrize(
    ("arch", "extra", "mode"),
    [
        ("llama", {}, "add"),
        ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=3), "fisher"),
        ("mistral", dict(tie_word_embeddings=True), "average"),
    ],
)
def test_streaming_equals_in_memory_bit_for_bit(arch, extra, mode, tmp_path):
    tokenizer = build_tokenizer()
    model = build_model(arch, num_layers=6, vocab_size=len(tokenizer), **extra)
    base = tmp_path / "base"
    model.save_pretrained(base, max_shard_size="100KB")  # several shards, split inside layers
    tokenizer.save_pretrained(base)
    assert (base / INDEX_NAME).is_file()
    accumulator = IGIAAccumulator()
    for grads in random_lora_grads(model, rank=4, steps=3):
        accumulator.update(grads)
    captured = set(accumulator.linear_names)

    def igia(name):
        return accumulator.igia(name) if name in captured else None

    plan = plan_removal(6, [1, 3, 4], 2, [0, 1, 0, 2, 3, 0])  # 4 and 3 merge into 2, 1 is dropped
    assert plan.merged == {3: 2, 4: 2}
    config = GradPruneConfig(prune_layers=3, merge_layers=2, merge_mode=mode, score="squared")

    memory = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    expected = merge_removed_layers(memory, plan, igia, config)
    remove_layers(memory, plan.removed)
    save_checkpoint(memory, tmp_path / "memory", tokenizer=tokenizer)

    out, fractions = stream_prune(base, tmp_path / "stream", plan, igia, config,
                                  max_shard_bytes=150_000)  # fmt: skip
    assert fractions == expected and fractions[3] and fractions[4]
    assert (out / INDEX_NAME).is_file() and len(set(weight_files(out).values())) > 1
    want, got = tensors_of(tmp_path / "memory"), tensors_of(out)
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert any(
        not torch.equal(got[f"model.layers.1.{s}"], tensors_of(base)[f"model.layers.2.{s}"])
        for s in ("self_attn.q_proj.weight", "mlp.down_proj.weight")
    )  # fmt: skip  (merged into old 2)
    streamed, in_memory = AutoConfig.from_pretrained(out), AutoConfig.from_pretrained(tmp_path / "memory")
    for key in ("num_hidden_layers", "layer_types", "max_window_layers", "tie_word_embeddings"):
        assert getattr(streamed, key, None) == getattr(in_memory, key, None), key
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[5, 17, 42, 99, 7, 30]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, memory(input_ids=ids).logits, rtol=0, atol=0)
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert oct((out).stat().st_mode & 0o777) == "0o755" and not list(tmp_path.glob(".stream.*"))


def test_single_file_checkpoint_and_failure_leaves_nothing(tmp_path):
    model = build_model("llama", num_layers=4, vocab_size=64)
    model.save_pretrained(tmp_path / "base")
    plan = plan_removal(4, [2], 0, [0] * 4)
    config = GradPruneConfig(prune_layers=1, merge_layers=0, score="squared")
    out, _ = stream_prune(tmp_path / "base", tmp_path / "out", plan, lambda name: None, config)
    assert (out / "model.safetensors").is_file() and not (out / INDEX_NAME).exists()
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    with pytest.raises(ValueError, match="the checkpoint has 4 decoder layers; the plan has 6"):
        stream_prune(tmp_path / "base", tmp_path / "bad", plan_removal(6, [2], 0, [0] * 6), lambda n: None, config)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.*"))


PEAK_RSS = textwrap.dedent("""
    import sys, torch
    from swift_gradpruner.config import GradPruneConfig
    from swift_gradpruner.selection import plan_removal
    base, out, path = sys.argv[1], sys.argv[2], sys.argv[3]
    plan = plan_removal(8, [2, 5], 1, [0, 0, 0, 0, 0, 1, 0, 0])
    config = GradPruneConfig(prune_layers=2, merge_layers=1, score="squared")
    gen = torch.Generator().manual_seed(0)
    igia = lambda name: torch.rand(1024, 1024, generator=gen, dtype=torch.float64) if "q_proj" in name else None
    from transformers import AutoModelForCausalLM  # imports done: their own peak is not the surgery's
    from swift_gradpruner.merge import merge_removed_layers
    from swift_gradpruner.streaming import stream_prune
    from swift_gradpruner.surgery import remove_layers, save_checkpoint
    from transformers import AutoConfig
    with torch.device("meta"):  # the model's code imported too (the removal check builds meta models)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    status = lambda key: int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(key)))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: resets the peak resident set size (VmHWM) to the current one
    before = status("VmRSS:")
    if path == "stream":
        stream_prune(base, out, plan, igia, config, max_shard_bytes=1)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
        merge_removed_layers(model, plan, igia, config)
        remove_layers(model, plan.removed)
        save_checkpoint(model, out)
    print((status("VmHWM:") - before) * 1024)
""")


@pytest.mark.slow
def test_streaming_peak_memory_is_about_one_layer(tmp_path):
    """8 layers of 28 MiB (hidden 1024, fp32): the in-memory path holds all of them, streaming about
    one layer plus the merge's source linear and F (measured as the growth of peak RSS)."""
    model = build_model("llama", num_layers=8, vocab_size=256, hidden=1024, heads=8, kv_heads=8, intermediate=1536)
    layer_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    model.save_pretrained(tmp_path / "base")
    del model
    grown = {}
    for path in ("memory", "stream"):
        proc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(tmp_path / "base"), str(tmp_path / path), path],
                              capture_output=True, text=True, timeout=600, check=True)  # fmt: skip
        grown[path] = int(proc.stdout.strip().splitlines()[-1])
    assert tensors_of(tmp_path / "stream").keys() == tensors_of(tmp_path / "memory").keys()
    assert grown["memory"] > 5 * layer_bytes, grown
    assert grown["stream"] < 3 * layer_bytes, (grown, layer_bytes)
    memory, stream = grown["memory"] / layer_bytes, grown["stream"] / layer_bytes
    print(f"peak growth: in memory {memory:.2f} layers, streaming {stream:.2f}")


def test_prune_checkpoint_streams_when_nothing_needs_the_model_loaded(tmp_path):
    """An IGIA ranking with no quality guard and no timing never runs the model: prune_checkpoint then
    streams, and writes what its in-memory path writes (which the timing turns on here)."""
    tokenizer = build_tokenizer()
    model = build_model("qwen2", num_layers=6, vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "base", max_shard_size="100KB")
    tokenizer.save_pretrained(tmp_path / "base")
    accumulator = IGIAAccumulator()
    for grads in random_lora_grads(model, rank=4, steps=2):
        accumulator.update(grads)
    results, logs = {}, []
    for name, benchmark in (("stream", False), ("memory", True)):
        config = GradPruneConfig(prune_layers=3, merge_layers=2, score="squared", benchmark=benchmark)
        results[name] = prune_checkpoint(tmp_path / "base", accumulator, config, tmp_path / name, {"run": name},
                                         {"model_type": "qwen2"}, log=logs.append)  # fmt: skip
    assert sum("streaming surgery" in line for line in logs) == 1
    stream, memory = results["stream"].report, results["memory"].report
    for key in ("dropped_layers", "merged_layers", "merged_fraction", "params_after", "layer_scores", "kept_layers"):
        assert stream[key] == memory[key], key
    assert len(stream["merged_layers"]) == 2 and "inference_benchmark" not in stream
    want, got = tensors_of(tmp_path / "memory"), tensors_of(tmp_path / "stream")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    saved = json.loads((tmp_path / "stream" / REPORT_NAME).read_text())
    assert saved["run"] == "stream" and saved["kept_layers"] == stream["kept_layers"]
    assert json.loads((tmp_path / "stream" / "args.json").read_text()) == {"model_type": "qwen2"}
    assert (tmp_path / "stream" / PLOT_NAME).is_file()
