"""gradprune bench and the per-run timing: FLOP counts against torch's counter, the alternating
measurement and its wording, the dense snapshot, the command's outputs and its one-line errors."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from swift_gradpruner import flops
from swift_gradpruner.bench.inference import TransformersEngine, Workload
from swift_gradpruner.bench.paired import Paired, alternate
from swift_gradpruner.cli import main
from swift_gradpruner.selection import plan_removal
from swift_gradpruner.surgery import Snapshot, remove_layers, save_checkpoint
from swift_gradpruner.tiny import ARCHITECTURES, build_model, build_tokenizer


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("tokens", [1, 37])
def test_analytic_flops_equal_torch_flop_counter(arch, tokens):
    shape = dict(num_layers=3, vocab_size=300, hidden=64, heads=4, kv_heads=2, intermediate=96)
    model = build_model(arch, **shape, attn_implementation="eager")  # the counter misses CPU's fused attention
    ids = torch.randint(300, (2, tokens))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=ids, use_cache=False)
    assert flops.forward_flops(model, tokens, batch=2) == counter.get_total_flops()
    # By hand: 3 layers x (q,o: 64x64; k,v: 64x32; gate,up,down: 64x96) + head 64x300; 3 layers x 4 heads x 16.
    linear = 3 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 96) + 64 * 300
    assert flops.matmul_weights(model) == linear and flops.attention_width(model) == 3 * 4 * 16
    with torch.device("meta"):  # the bench counts from meta models: same answer, nothing allocated
        meta = build_model(arch, **shape)
    assert flops.forward_flops(meta, tokens, batch=2) == counter.get_total_flops()


def test_alternate_runs_abba_rounds_after_warmup_and_reports_median_ratio():
    calls = []
    dense_times, pruned_times = iter([9.0, 1.0, 2.0, 1.5, 4.0]), iter([9.0, 0.5, 1.2, 0.6, 2.0])
    paired = alternate(lambda: calls.append("d") or next(dense_times), lambda: calls.append("p") or next(pruned_times),
                       "decode time", "s", rounds=4)  # fmt: skip
    assert calls == ["d", "p", "d", "p", "p", "d", "d", "p", "p", "d"]  # warm-up, then ABBA
    assert paired.dense == [1.0, 2.0, 1.5, 4.0] and paired.pruned == [0.5, 1.2, 0.6, 2.0]
    assert paired.ratio == pytest.approx(0.5)  # median of 0.5, 0.6, 0.4, 0.5
    assert paired.trusted is False  # 0.4-0.6 spans 40% of the median
    entry = paired.to_dict()
    assert entry["dense"]["median"] == 1.75 and entry["ratio_min"] == pytest.approx(0.4)
    assert "2.00x faster" in entry["text"] and "UNRELIABLE" in entry["text"]


def test_wording_says_slower_below_one_and_trusts_tight_rounds():
    slower = Paired("decode time", "s", [1.0, 1.0, 1.0], [1.2, 1.25, 1.3])
    assert slower.trusted and "1.25x slower" in slower.text() and "125% of dense" in slower.text()
    assert "faster" not in slower.text() and "UNRELIABLE" not in slower.text()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_snapshot_runs_the_dense_model_again_after_merge_and_removal(arch):
    torch.manual_seed(0)
    model = build_model(arch, num_layers=6, vocab_size=128)
    ids = torch.randint(3, 128, (2, 12))
    dense_logits = model(input_ids=ids, use_cache=False).logits.detach()
    generate = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    dense_tokens = model.generate(input_ids=ids, **generate)  # with the KV cache, indexed by layer_idx
    plan = plan_removal(6, [1, 4], 1, [0, 0, 0, 0, 1, 0])  # 4 merges into 3: its weights change in place
    snapshot = Snapshot(model, weights_of=sorted(set(plan.merged.values())))
    with torch.no_grad():
        for p in model.model.layers[3].parameters():
            p.add_(0.5)  # stands in for the merge
    remove_layers(model, plan.removed)
    pruned_logits = model(input_ids=ids, use_cache=False).logits.detach()
    pruned_tokens = model.generate(input_ids=ids, **generate)
    assert not torch.allclose(pruned_logits, dense_logits)
    for _ in range(2):
        with snapshot.restored() as dense:
            assert len(dense.model.layers) == dense.config.num_hidden_layers == 6
            torch.testing.assert_close(dense(input_ids=ids, use_cache=False).logits, dense_logits)
            assert torch.equal(dense.generate(input_ids=ids, **generate), dense_tokens)
        assert len(model.model.layers) == model.config.num_hidden_layers == 4
        assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
        torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, pruned_logits)
        assert torch.equal(model.generate(input_ids=ids, **generate), pruned_tokens)


def test_transformers_engine_generates_exactly_the_workload_even_when_eos_is_the_argmax():
    model = build_model("llama", num_layers=2, vocab_size=64)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: greedy picks token 0, the pad id ...
    model.generation_config.eos_token_id = 0  # ... and eos: an unforced generate would stop at once
    assert TransformersEngine(model).run(Workload("decode", 2, 8, 5)) > 0


def test_workload_fits_the_position_limit():
    assert Workload("prefill", 8, 512, 1).fitted(256) == Workload("prefill", 8, 255, 1)
    assert Workload("decode", 8, 32, 128).fitted(None).prompt_tokens == 32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny dense Llama with its tokenizer and a pruned copy (2 of 6 layers removed)."""
    root = tmp_path_factory.mktemp("bench")
    tokenizer = build_tokenizer()
    model = build_model("llama", num_layers=6, vocab_size=len(tokenizer))
    save_checkpoint(model, root / "dense", tokenizer=tokenizer)
    remove_layers(model, [2, 4])
    save_checkpoint(model, root / "pruned", tokenizer=tokenizer)
    return root


def test_bench_command_writes_table_json_and_plot(models, tmp_path, capsys):
    out = tmp_path / "bench"
    args = [str(models / "dense"), str(models / "pruned"), "--output", str(out), "--backend", "transformers",
            "--rounds", "3", "--batch", "2", "--seq", "32"]  # fmt: skip
    assert main(["bench", *args]) == 0
    results = json.loads((out / "bench.json").read_text())
    counts = results["counts"]
    assert (counts["dense"]["layers"], counts["pruned"]["layers"]) == (6, 4)
    dense = build_model("llama", num_layers=6, vocab_size=len(build_tokenizer()))
    assert counts["dense"]["parameters"] == sum(p.numel() for p in dense.parameters())
    assert counts["dense"]["flops_per_token"] == flops.forward_flops(dense, 32) / 32
    for mode in ("lora", "full"):
        entry = results["training"][mode]
        assert entry["rounds"] == 3 and len(entry["pruned"]["values"]) == 3
        assert 0 < entry["peak_memory_bytes"]["pruned"] < entry["peak_memory_bytes"]["dense"]
    assert results["training"]["full"]["peak_memory_bytes"]["dense"] > results["training"]["lora"][
        "peak_memory_bytes"]["dense"]  # fmt: skip
    assert set(results["inference"]["workloads"]) == {"decode", "prefill", "latency"}
    table = (out / "bench.md").read_text()
    assert "| Model | Parameters | FLOPs/token | Train time (lora)" in table and "| Pruned | " in table
    assert (out / "bench.png").stat().st_size > 0 and not list(out.glob(".*tmp*"))
    assert "| Dense | 100%" in capsys.readouterr().out


def _bad(tmp_path, models):
    other = tmp_path / "other"
    tokenizer = build_tokenizer()
    save_checkpoint(build_model("qwen2", num_layers=2, vocab_size=len(tokenizer)), other, tokenizer=tokenizer)
    retok = tmp_path / "retok"
    shutil.copytree(models / "pruned", retok)
    data = json.loads((retok / "tokenizer.json").read_text())
    data["model"]["vocab"]["zzz"] = data["model"]["vocab"].pop(next(iter(data["model"]["vocab"])))
    (retok / "tokenizer.json").write_text(json.dumps(data))
    adapter = tmp_path / "checkpoint-4"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    return {
        "empty": ([str(tmp_path), str(models / "pruned")], "is not a model folder (no config.json)"),
        "adapter": ([str(models / "dense"), str(adapter)], "is a LoRA adapter: merge it first (swift export"),
        "arch": ([str(models / "dense"), str(other)], "the models differ in model_type"),
        "tokenizer": ([str(models / "dense"), str(retok)], "different tokenizers (tokenizer.json"),
        "backend": ([str(models / "dense"), str(models / "pruned"), "--backend", "onnx"], "--backend 'onnx'"),
        "rounds": ([str(models / "dense"), str(models / "pruned"), "--rounds", "1"], "--rounds 1"),
        "train": ([str(models / "dense"), str(models / "pruned"), "--train", "qlora"], "--train qlora"),
    }


@pytest.mark.parametrize("case", ["empty", "adapter", "arch", "tokenizer", "backend", "rounds", "train"])
def test_bench_bad_input_fails_with_one_line_before_any_work(case, models, tmp_path, capsys):
    args, message = _bad(tmp_path, models)[case]
    capsys.readouterr()  # saving the models above printed progress bars
    assert main(["bench", *args, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gradprune bench: error:") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_bench_says_how_to_install_vllm_when_it_is_missing(models, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    assert main(["bench", str(models / "dense"), str(models / "pruned"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "vLLM is not installed" in err and "--backend transformers" in err


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (EXTRAS=vllm setup.sh)")
def test_bench_with_vllm_times_both_models_in_alternating_rounds(tmp_path):
    """Tiny Llama with head_dim 64 (vLLM's CPU attention refuses 16), 2 of 4 layers removed, in a
    subprocess as a user runs it (vLLM spawns its engine processes)."""
    tokenizer = build_tokenizer()
    model = build_model("llama", num_layers=4, vocab_size=len(tokenizer), hidden=128, heads=2, kv_heads=1,
                        intermediate=256)  # fmt: skip
    save_checkpoint(model, tmp_path / "dense", tokenizer=tokenizer)
    remove_layers(model, [1, 2])
    save_checkpoint(model, tmp_path / "pruned", tokenizer=tokenizer)
    proc = subprocess.run(
        [sys.executable, "-m", "swift_gradpruner.cli", "bench", str(tmp_path / "dense"), str(tmp_path / "pruned"),
         "--output", str(tmp_path / "out"), "--backend", "vllm", "--train", "none", "--rounds", "3"],
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-5000:]
    results = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert results["inference"]["backend"] == "vllm" and results["training"] == {}
    for name, entry in results["inference"]["workloads"].items():
        assert len(entry["dense"]["values"]) == len(entry["pruned"]["values"]) == 3, name
        assert entry["dense_tokens_per_s"] > 0 and entry["pruned_tokens_per_s"] > 0
    assert "| Pruned | 5" in (tmp_path / "out" / "bench.md").read_text()  # parameters: 5x.x% of dense
