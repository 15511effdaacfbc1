import json
import statistics
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import reference
from conftest import random_lora_grads
from swift_gradpruner.architecture import UnsupportedModelError
from swift_gradpruner.config import GradPruneConfig
from swift_gradpruner.importance import IGIAAccumulator
from swift_gradpruner.prune import prune_model, save_pruned
from swift_gradpruner.report import PLOT_NAME, REPORT_NAME, read_report
from swift_gradpruner.surgery import remove_layers, save_checkpoint
from swift_gradpruner.tiny import ARCHITECTURES, build_model

# Layer j's gradients are scaled by LAYER_SCALE[j]: layers 3, 1, 5 score lowest (in that order),
# so pruning 3 removes {1, 3, 5}; the highest-scoring of them, 5, merges into retained layer 4.
LAYER_SCALE = [5.0, 1.0, 4.0, 0.5, 3.0, 2.0]
INPUT = torch.tensor([[5, 17, 42, 99, 7, 300, 12, 8, 64, 3]])


def tiny(arch, tokenizer, seed=0):
    extra = {}
    if arch in ("qwen2", "qwen3"):
        # Mixed full/sliding layers, so that layer_types and max_window_layers must follow the pruning.
        extra = dict(use_sliding_window=True, sliding_window=4, max_window_layers=3)
    if arch == "mistral":
        extra = dict(sliding_window=4)
    return build_model(arch, num_layers=6, vocab_size=len(tokenizer), seed=seed, **extra).eval()


def scaled_steps(model, steps=3, seed=0):
    out = random_lora_grads(model, rank=4, steps=steps, seed=seed)
    for grads in out:
        for name, (a, b) in grads.items():
            s = LAYER_SCALE[int(name.split(".")[2])]
            grads[name] = (a * s, b * s)
    return out


def accumulate(steps):
    acc = IGIAAccumulator()
    for grads in steps:
        acc.update(grads)
    return acc


def logits(model, ids=INPUT):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prune_save_reload_generate(arch, tokenizer, tmp_path):
    model = tiny(arch, tokenizer)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    steps = scaled_steps(model)
    config = GradPruneConfig(prune_layers=3, merge_layers=1, score="squared")
    result = prune_model(model, accumulate(steps), config)
    assert result.plan.dropped == (1, 3) and dict(result.plan.merged) == {5: 4}
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    timing = result.report["inference_benchmark"]  # dense and pruned in alternating rounds, 32 new tokens
    decode = timing["workloads"]["decode"]
    assert (timing["device"], decode["workload"]["new_tokens"], decode["rounds"]) == ("cpu", 32, 5)
    per_round = [p / d for d, p in zip(decode["dense"]["values"], decode["pruned"]["values"])]
    assert decode["ratio"] == pytest.approx(statistics.median(per_round))
    if arch in ("qwen2", "qwen3"):
        # Kept layers 0, 2, 4: 0 and 2 were full attention (< 3), 4 was sliding.
        assert model.config.layer_types == ["full_attention", "full_attention", "sliding_attention"]
        assert model.config.max_window_layers == 2

    # The merged linear equals the element-by-element reference of Eq. 5 on the original weights.
    ref_f = reference.igia(steps)
    for suffix in ("self_attn.k_proj", "mlp.down_proj"):
        w_r = original[f"model.layers.4.{suffix}.weight"]
        w_m = original[f"model.layers.5.{suffix}.weight"]
        expected = reference.merge(w_r, [(w_m, ref_f[f"model.layers.5.{suffix}"])], 0.2, "add")
        got = model.model.layers[2].get_submodule(suffix).weight
        torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
        assert not torch.equal(got, w_r)
    # Layers that were not merge targets are untouched.
    torch.testing.assert_close(model.model.layers[1].mlp.up_proj.weight, original["model.layers.2.mlp.up_proj.weight"])

    out = save_pruned(model, result, tmp_path / "pruned", tokenizer=tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(model) and reloaded.config.num_hidden_layers == 3
    saved_config = json.loads((out / "config.json").read_text())
    assert saved_config["num_hidden_layers"] == 3
    assert saved_config.get("layer_types") == getattr(model.config, "layer_types", None)
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=0)

    prompt = INPUT[:, :6]
    cached = reloaded.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    uncached = reloaded.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert cached.shape[1] > prompt.shape[1]
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True))

    report = read_report(out)
    assert report["dropped_layers"] == [1, 3] and report["merged_layers"] == {"5": 4}
    assert report["num_layers_before"] == 6 and report["num_layers_after"] == 3
    assert report["params_after"] == sum(p.numel() for p in reloaded.parameters())
    assert report["params_before"] == sum(v.numel() for v in original.values())
    assert report["steps"] == {"used": 3, "skipped_nonfinite": 0, "zero": 0}
    assert set(report["merged_fraction"]["5"]) == {n.split("layers.5.")[1] for n in ref_f if ".layers.5." in n}
    assert all(0 < v <= 0.2 for v in report["merged_fraction"]["5"].values())
    assert report["config"]["prune_layers"] == 3
    scores = report["layer_scores"]
    assert scores[3] < scores[1] < scores[5] < min(scores[0], scores[2], scores[4])
    assert (out / PLOT_NAME).stat().st_size > 1000
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert reloaded.generation_config.eos_token_id == 2


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_pruned_model_computes_the_original_with_layers_skipped(arch, tokenizer):
    """Reference: the unpruned model whose removed layers are bypassed by an identity hook."""
    model = tiny(arch, tokenizer)
    dense = tiny(arch, tokenizer)
    result = prune_model(
        model, accumulate(scaled_steps(model)), GradPruneConfig(prune_layers=3, merge_layers=0, score="squared")
    )
    assert result.plan.removed == (1, 3, 5)
    for j in result.plan.removed:
        dense.model.layers[j].register_forward_hook(lambda mod, args, kwargs, out: args[0], with_kwargs=True)
    torch.testing.assert_close(logits(model), logits(dense), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_pruning_zero_layers_reproduces_the_original(arch, tokenizer, tmp_path):
    model = tiny(arch, tokenizer)
    before = logits(model)
    remove_layers(model, [])
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)
    out = save_checkpoint(model, tmp_path / "same")
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out)), before, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tied_embeddings_stay_tied_through_prune_save_reload(arch, tokenizer, tmp_path):
    """Small models (SmolLM2, Qwen2.5-0.5B) tie the LM head to the embeddings: the pruned checkpoint
    must keep the tie (one tensor on disk, one after reload) and compute what the pruned model did."""
    model = build_model(arch, num_layers=6, vocab_size=len(tokenizer), seed=1, tie_word_embeddings=True).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    config = GradPruneConfig(prune_layers=3, merge_layers=1, score="squared", benchmark=False)
    result = prune_model(model, accumulate(scaled_steps(model)), config)
    expected = logits(model)
    out = save_pruned(model, result, tmp_path / "tied")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.tie_word_embeddings and reloaded.config.num_hidden_layers == 3
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        stored = handle.keys()
    assert "lm_head.weight" not in stored  # stored once
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=0)
    assert result.report["params_after"] == sum(p.numel() for p in reloaded.parameters())


def test_unsupported_architecture_fails_before_work(tokenizer):
    config = AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2, vocab_size=64)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="model_type 'gpt2'; supported: llama, mistral, qwen2, qwen3"):
        prune_model(model, IGIAAccumulator(), GradPruneConfig(prune_layers=1, merge_layers=0, score="squared"))


def test_pre_quantised_checkpoint_is_refused(tokenizer):
    model = tiny("llama", tokenizer)
    model.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(UnsupportedModelError, match="pre-quantised checkpoint"):
        remove_layers(model, [1])


def test_failed_save_leaves_nothing_and_existing_output_is_kept(tokenizer, tmp_path, monkeypatch):
    model = tiny("llama", tokenizer)

    class Broken:
        def save_pretrained(self, path):
            (path / "partial.txt").write_text("half")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, tmp_path / "out", tokenizer=Broken())
    assert list(tmp_path.iterdir()) == []

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        save_checkpoint(model, tmp_path / "out")
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, tmp_path / "out", tokenizer=Broken(), overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    # The second rename fails (after the old folder was moved aside): the old folder comes back.
    real_rename = Path.rename

    def failing_rename(self, target):
        if self.name.endswith(".tmp"):
            raise OSError("rename failed")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint(model, tmp_path / "out", overwrite=True)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    save_checkpoint(model, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755  # readable by a server running as another user


def test_report_written_with_checkpoint(tokenizer, tmp_path):
    model = tiny("llama", tokenizer)
    result = prune_model(
        model, accumulate(scaled_steps(model)), GradPruneConfig(prune_layers=2, merge_layers=1, score="squared")
    )
    out = save_pruned(model, result, tmp_path / "m")
    assert json.loads((out / REPORT_NAME).read_text()) == json.loads(json.dumps(result.report))
