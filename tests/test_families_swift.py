"""Every new family through `swift sft --gradprune true` with its own swift model_type and template (one run
each, the default criterion): the pruned checkpoint reloads equal to the dense model with the same layers
removed, generates with its KV cache as without, a vision-language model keeps its vision tower byte for
byte, and vLLM on CPU serves the families it can with transformers' greedy tokens."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from swift_gradpruner.architecture import auto_class, text_config
from swift_gradpruner.config import GradPruneConfig
from swift_gradpruner.surgery import remove_layers
from swift_gradpruner.tiny_families import build_family_tokenizer, create_family
from swift_run import check, report_of, run_dir, swift
from test_families import NEW, assert_reload_and_cache

pytestmark = pytest.mark.slow

VLLM = [f for f in NEW if f.vllm_cpu]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """family -> its swift run (made on first use, once per family): the base and pruned model folders,
    the report and the output."""
    root = tmp_path_factory.mktemp("families")
    done: dict[str, dict] = {}

    def run(family) -> dict:
        if family.model_type not in done:
            work = root / family.model_type
            # vLLM's CPU attention needs head_dim 64; the others train faster at 16.
            base, data = create_family(work, family.model_type, rows=32, head_dim=64 if family.vllm_cpu else 16)
            out = work / "out"
            proc = check(swift(
                "sft", "--model", str(base), "--model_type", family.swift_model_type, "--template", family.template,
                "--dataset", str(data), "--tuner_type", "lora", "--torch_dtype", "float32", "--fp16", "false",
                "--dataloader_num_workers", "0", "--report_to", "none", "--check_model", "false", "--seed", "42",
                "--max_steps", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                "--output_dir", str(out), "--gradprune", "true", "--gradprune_prune_layers", "1",
                "--gradprune_merge_layers", "0", "--gradprune_benchmark", "false",
                *(["--lora_dropout", "0"] if family.lora_dropout_zero else []),
                cwd=work,
            ))  # fmt: skip
            pruned = run_dir(out) / "gradprune" / "model"
            done[family.model_type] = {"base": base, "pruned": pruned, "report": report_of(out), "out": out,
                                       "output": proc.output}  # fmt: skip
        return done[family.model_type]

    return run


@pytest.mark.parametrize("family", NEW, ids=[f.model_type for f in NEW])
def test_swift_sft_gradprune_on_each_family(family, runs, tmp_path):
    run = runs(family)
    report = run["report"]
    assert report["model_type"] == family.model_type
    assert (report["num_layers_before"], report["num_layers_after"]) == (4, 3)
    assert report["merged_layers"] == {} and len(report["dropped_layers"]) == 1
    assert "[GradPruner] removed 1 of 4 layers" in run["output"]
    checkpoints = list(run_dir(run["out"]).glob("checkpoint-*"))
    assert checkpoints and json.loads((checkpoints[0] / "args.json").read_text())["model"] == str(run["pruned"])
    # The in-memory equivalent: the dense model with the same layer removed.
    dense = auto_class(_config(run["base"])).from_pretrained(run["base"], dtype=torch.float32).eval()
    remove_layers(dense, report["dropped_layers"])
    reloaded = assert_reload_and_cache(dense, tmp_path / "in_memory", len(build_family_tokenizer()))
    pruned = auto_class(_config(run["pruned"])).from_pretrained(run["pruned"], dtype=torch.float32).eval()
    mine, theirs = (text_config(m.config).to_dict() for m in (pruned, reloaded))
    assert {k: v for k, v in mine.items() if k != "_name_or_path"} == {k: v for k, v in theirs.items()
                                                                        if k != "_name_or_path"}  # fmt: skip
    for (name, mine), (other, theirs) in zip(pruned.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert name == other and torch.equal(mine, theirs), name


def _config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


VISION = [f for f in NEW if f.vision]


@pytest.mark.parametrize("family", VISION, ids=[f.model_type for f in VISION])
def test_vision_tower_and_processor_unchanged(family, runs):
    from safetensors import safe_open

    run = runs(family)

    def tensors(folder: Path, keep) -> dict[str, torch.Tensor]:
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            return {k: f.get_tensor(k) for k in list(f.keys()) if keep(k)}

    def vision(key: str) -> bool:
        return key.startswith(("vision_tower.", "multi_modal_projector."))

    before, after = tensors(run["base"], vision), tensors(run["pruned"], vision)
    assert before and set(before) == set(after)
    for key, value in before.items():
        assert value.dtype == after[key].dtype and torch.equal(value, after[key]), key
    assert (run["pruned"] / "processor_config.json").read_bytes() == (
        run["base"] / "processor_config.json"
    ).read_bytes()
    layer_keys = {k for k in tensors(run["pruned"], lambda k: ".layers." in k)}
    assert {k.split(".layers.")[1].split(".")[0] for k in layer_keys} == {"0", "1", "2"}


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (EXTRAS=vllm)")
def test_vllm_on_cpu_serves_the_pruned_families_with_transformers_tokens(runs, tmp_path):
    """The swift-pruned checkpoint of every family vLLM on CPU serves: vLLM's greedy tokens equal
    transformers'. gpt-oss, whose vLLM model takes sliding windows from layer parity, is checked on two
    in-memory prunes instead (the criterion's choice decides the parity): one that keeps the alternation
    is served exactly; one that breaks it is flagged in the report and vLLM really computes another model."""
    from test_vllm_serving import prompts_of, transformers_greedy, vllm_generate

    from swift_gradpruner.prune import prune_model
    from swift_gradpruner.serving import vllm_refusal
    from swift_gradpruner.tiny_families import build_family

    tokenizer = build_family_tokenizer()
    prompts = prompts_of(tokenizer)
    models = {f.model_type: runs(f)["pruned"] for f in VLLM if f.model_type != "gpt_oss"}
    model = build_family("gpt_oss", len(tokenizer), head_dim=64)
    report = prune_model(model, None, GradPruneConfig(prune_layers=1, score="last", benchmark=False)).report
    for name, removed in (("gpt_oss", [3]), ("gpt_oss_parity_broken", [1])):
        model = build_family("gpt_oss", len(tokenizer), head_dim=64)
        remove_layers(model, removed)
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        models[name] = tmp_path / name
    assert "vllm_unsupported" in report  # score=last removed layer 2: [sliding, full, full] breaks the parity
    assert vllm_refusal(_config(models["gpt_oss"])) is None
    assert "takes each layer's attention from its index" in vllm_refusal(_config(models["gpt_oss_parity_broken"]))
    served = vllm_generate(models, prompts, tmp_path, timeout=540)["results"]
    for name, folder in models.items():
        assert "tokens" in served[name], f"{name}: {served[name].get('error', '')[-2000:]}"
        same = served[name]["tokens"] == transformers_greedy(folder, prompts)[0]
        assert same is (name != "gpt_oss_parity_broken"), name
