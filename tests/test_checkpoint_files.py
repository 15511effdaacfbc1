"""What a pruned checkpoint takes from the base one besides the kept layers, on both paths (streaming and in
memory): multi-token-prediction (MTP) layers, renumbered after the kept layers, and the other files, except
Mistral's native params.json."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import random_lora_grads, tensors_of
from swift_gradpruner.checkpoint import _has_safetensors, prune_checkpoint
from swift_gradpruner.config import GradPruneConfig
from swift_gradpruner.importance import IGIAAccumulator
from swift_gradpruner.selection import plan_removal
from swift_gradpruner.streaming import INDEX_NAME, has_layer_keys, stream_prune
from swift_gradpruner.tiny import build_model, build_tokenizer
from swift_gradpruner.tiny_families import build_family, build_family_tokenizer


def assert_index_matches_files(folder) -> None:
    """Every shard the index names exists and holds exactly the tensors the index puts there, and the index's
    total_size is the tensors' bytes (as save_pretrained writes it)."""
    index = json.loads((folder / INDEX_NAME).read_text())
    by_file: dict[str, set] = {}
    for key, name in index["weight_map"].items():
        by_file.setdefault(name, set()).add(key)
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert shards == sorted(by_file) == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in
                                         range(1, len(shards) + 1)]  # fmt: skip
    total = 0
    for name, keys in by_file.items():
        with safe_open(folder / name, framework="pt") as f:
            assert set(f.keys()) == keys, name
            total += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in keys)
    assert index["metadata"]["total_size"] == total


def mtp_checkpoint(folder, model_type: str):
    """A tiny 4-layer ``model_type`` checkpoint with one MTP layer, as DeepSeek-V3 and GLM-4.5 store it: a
    decoder layer at model.layers.4 (index num_hidden_layers) plus its own norms, projection and head, and
    ``num_nextn_predict_layers: 1`` in config.json. Several shards."""
    tokenizer = build_family_tokenizer()
    five = build_family(model_type, len(tokenizer), num_layers=5)
    five.save_pretrained(folder, max_shard_size="200KB")
    tokenizer.save_pretrained(folder)
    hidden, vocab = five.config.hidden_size, five.config.vocab_size
    gen = torch.Generator().manual_seed(3)
    extra = {"enorm.weight": torch.rand(hidden, generator=gen), "hnorm.weight": torch.rand(hidden, generator=gen),
             "eh_proj.weight": torch.randn(hidden, 2 * hidden, generator=gen),
             "shared_head.norm.weight": torch.rand(hidden, generator=gen),
             "shared_head.head.weight": torch.randn(vocab, hidden, generator=gen),
             "embed_tokens.weight": torch.randn(vocab, hidden, generator=gen)}  # fmt: skip
    save_file({f"model.layers.4.{k}": v for k, v in extra.items()}, str(folder / "mtp-extra.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    index = json.loads((folder / INDEX_NAME).read_text())
    index["weight_map"].update({f"model.layers.4.{k}": "mtp-extra.safetensors" for k in extra})
    (folder / INDEX_NAME).write_text(json.dumps(index))
    config = json.loads((folder / "config.json").read_text())
    config.update(num_hidden_layers=4, num_nextn_predict_layers=1)
    (folder / "config.json").write_text(json.dumps(config))
    return build_family(model_type, len(tokenizer), num_layers=4)  # the decoder the config describes


def batches(vocab: int) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(40, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}]


@pytest.mark.parametrize("model_type", ["glm4_moe", "deepseek_v3"])
def test_mtp_layers_are_kept_after_the_kept_layers_on_both_paths(model_type, tmp_path):
    """Two of four layers removed in memory (prune_checkpoint, block_influence) and, with the same plan, by
    streaming: the MTP layer (model.layers.4) is written as model.layers.2 with the same values, config keeps
    num_nextn_predict_layers, the index matches the shards, both paths write the same tensors, and the
    pruned model reloads and runs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = tmp_path / "base"
    model = mtp_checkpoint(base, model_type)
    assert _has_safetensors(base)  # prune_checkpoint would stream this checkpoint with an IGIA score
    source = tensors_of(base)
    mtp = {key.removeprefix("model.layers.4."): value for key, value in source.items()
           if key.startswith("model.layers.4.")}  # fmt: skip
    assert len(mtp) > 10
    config = GradPruneConfig(prune_layers=2, score="block_influence", benchmark=False)
    result = prune_checkpoint(base, None, config, tmp_path / "memory", {}, {"model_type": model_type},
                              calibration=batches(model.config.vocab_size), log=lambda s: None)  # fmt: skip
    stream_prune(base, tmp_path / "stream", result.plan, lambda name: None, config, max_shard_bytes=150_000)
    for name in ("memory", "stream"):
        out = tmp_path / name
        saved = json.loads((out / "config.json").read_text())
        assert (saved["num_hidden_layers"], saved["num_nextn_predict_layers"]) == (2, 1), name
        got = tensors_of(out)
        assert {int(k.split(".")[2]) for k in got if k.startswith("model.layers.")} == {0, 1, 2}, name
        kept = {key.removeprefix("model.layers.2."): value for key, value in got.items()
                if key.startswith("model.layers.2.")}  # fmt: skip
        assert kept.keys() == mtp.keys(), name
        assert all(torch.equal(kept[k], mtp[k]) for k in mtp), name
        assert_index_matches_files(out)
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert AutoConfig.from_pretrained(out).num_nextn_predict_layers == 1
        with torch.no_grad():
            assert torch.isfinite(reloaded(torch.tensor([[40, 41, 42]])).logits).all()
    memory, stream = tensors_of(tmp_path / "memory"), tensors_of(tmp_path / "stream")
    assert memory.keys() == stream.keys() and all(torch.equal(memory[k], stream[k]) for k in memory)


def test_after_save_steps_run_last_in_order_and_the_mtp_step_is_one(tmp_path):
    """Issue 33 item 5: the MTP copy rewrites the index save_pretrained wrote. It once rode in extra_files under
    the index's name and ran last only by dict order; now it is an after_save step, which save_checkpoint runs
    after the weights, the tokenizer and every extra file, in list order."""
    from swift_gradpruner import checkpoint
    from swift_gradpruner.surgery import save_checkpoint

    seen: list[tuple[str, list[str]]] = []

    def step(name):
        return lambda folder: seen.append((name, sorted(p.name for p in folder.iterdir())))

    tokenizer = build_tokenizer()
    model = build_model("llama", num_layers=2, vocab_size=len(tokenizer))
    extra = {"late.json": lambda path: path.write_text("{}")}
    save_checkpoint(model, tmp_path / "out", tokenizer=tokenizer, extra_files=extra, after_save=[step("a"), step("b")])
    assert [name for name, _ in seen] == ["a", "b"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "late.json"} <= set(seen[0][1])
    mtp_checkpoint(tmp_path / "base", "glm4_moe")
    files = checkpoint._other_files(tmp_path / "base")
    assert INDEX_NAME not in files and not any(callable(content) for content in files.values())
    assert len(checkpoint._after_save(tmp_path / "base")) == 1
    assert checkpoint._after_save(tmp_path / "out") == []  # no MTP tensors: nothing to do after saving


def test_qwen3_next_style_mtp_tensors_are_kept_as_they_are(tmp_path):
    """``mtp.*`` tensors (Qwen3-Next's MTP module, numbered inside it) are not the model's: the in-memory path
    copies them from the base shards unchanged, as streaming does."""
    tokenizer = build_tokenizer()
    base = tmp_path / "base"
    build_model("llama", num_layers=4, vocab_size=len(tokenizer)).save_pretrained(base, max_shard_size="100KB")
    tokenizer.save_pretrained(base)
    mtp = {"mtp.fc.weight": torch.randn(64, 128), "mtp.layers.0.mlp.up_proj.weight": torch.randn(32, 64)}
    save_file(mtp, str(base / "mtp.safetensors"), metadata={"format": "pt"})
    index = json.loads((base / INDEX_NAME).read_text())
    index["weight_map"].update(dict.fromkeys(mtp, "mtp.safetensors"))
    (base / INDEX_NAME).write_text(json.dumps(index))
    config = GradPruneConfig(prune_layers=1, score="block_influence", benchmark=False)
    result = prune_checkpoint(base, None, config, tmp_path / "memory", {}, {"model_type": "llama"},
                              calibration=batches(len(tokenizer)), log=lambda s: None)  # fmt: skip
    stream_prune(base, tmp_path / "stream", result.plan, lambda name: None, config)
    for name in ("memory", "stream"):
        got = tensors_of(tmp_path / name)
        assert all(torch.equal(got[key], value) for key, value in mtp.items()), name
        assert {int(k.split(".")[2]) for k in got if k.startswith("model.layers.")} == {0, 1, 2}, name


def test_layers_beyond_the_announced_mtp_layers_are_not_streamed(tmp_path):
    """A checkpoint with a layer after the decoder layers that its config does not announce is not read as MTP:
    it is pruned in memory (which keeps only what the model holds), and streaming it directly fails."""
    base = tmp_path / "base"
    mtp_checkpoint(base, "glm4_moe")
    assert has_layer_keys(base, "model.layers.", 4, mtp=1)
    assert not has_layer_keys(base, "model.layers.", 4, mtp=0) and not has_layer_keys(base, "model.layers.", 3, 1)
    config = json.loads((base / "config.json").read_text())
    config["num_nextn_predict_layers"] = 0
    (base / "config.json").write_text(json.dumps(config))
    plan = plan_removal(4, [1], 0, [0] * 4)
    with pytest.raises(ValueError, match=r"layers \[4\] beyond its 4 decoder layers"):
        stream_prune(base, tmp_path / "out", plan, lambda name: None, GradPruneConfig(prune_layers=1, score="squared"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("benchmark", [False, True], ids=["stream", "memory"])
def test_mistral_params_json_is_dropped_and_other_files_are_kept(benchmark, tmp_path):
    """A Mistral folder with both formats' configs: params.json (the native format's, dense n_layers) is not
    in the pruned checkpoint, whose weights are Hugging Face's; the model card and chat template are copied."""
    tokenizer = build_tokenizer()
    model = build_model("mistral", num_layers=4, vocab_size=len(tokenizer))
    base = tmp_path / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    (base / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 4, "n_heads": 4, "vocab_size": 300}))
    (base / "README.md").write_text("# model card")
    (base / "chat_template.jinja").write_text("{{ messages }}")
    accumulator = IGIAAccumulator()
    for grads in random_lora_grads(model, rank=4, steps=2):
        accumulator.update(grads)
    config = GradPruneConfig(prune_layers=1, score="squared", benchmark=benchmark)
    prune_checkpoint(base, accumulator, config, tmp_path / "out", {}, {"model_type": "mistral"}, log=lambda s: None)
    out = tmp_path / "out"
    assert not (out / "params.json").exists()
    assert (out / "README.md").read_text() == "# model card"
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
