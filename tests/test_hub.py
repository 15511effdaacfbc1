"""Issue 33: `swift sft --model <org>/<name> --gradprune true` as users type it, through a loopback hub
(tests/hub_server.py) that serves tiny models over the endpoints huggingface_hub and modelscope call.

swift's argument parsing fetches the config and tokenizer only; the prune step reads the weights on rank 0,
so GradPruner asks swift's own hub function for them first (swift/hub.py). Each run here starts from an
empty hub cache unless it says otherwise, so the weights reach the prune step only through that download.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from hub_server import LoopbackHub
from swift_gradpruner.tiny import create_tiny
from swift_run import COMMON, TESTS, check, free_port, report_of, run_dir, swift

pytestmark = pytest.mark.slow
REPO = "org/tiny-llama"
QWEN = "Qwen/Qwen2.5-7B-Instruct"
REUSED = "[GradPruner] reusing the pruned model of an earlier run with the same settings"
FETCHING = f"[GradPruner] fetching the weights of {REPO}"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    llama, data = create_tiny(root / "llama", "llama", num_layers=6, rows=96)
    qwen, _ = create_tiny(root / "qwen2", "qwen2", num_layers=6, rows=8)
    with LoopbackHub({REPO: llama, QWEN: qwen}) as server:
        yield server, root, data


def sft_args(data: Path, out: Path, *extra: str, model: str = REPO, steps: int = 4) -> list[str]:
    return ["sft", "--model", model, "--model_type", "llama", "--dataset", str(data), *COMMON, "--tuner_type", "lora",
            "--max_steps", str(steps), "--save_steps", str(steps), "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "1", "--output_dir", str(out), "--gradprune", "true",
            "--gradprune_benchmark", "false", "--gradprune_guard_rows", "8", *extra]  # fmt: skip


def weights_requested(server: LoopbackHub, since: int) -> list[str]:
    return [r for r in server.requests[since:] if r.startswith("GET") and "model.safetensors" in r]


def test_hugging_face_id_with_the_defaults_then_a_new_learning_rate_reuses_the_pruned_model(hub, tmp_path):
    server, root, data = hub
    env = {**server.env(tmp_path / "cache"), "USE_HF": "1"}
    out = tmp_path / "out"
    before = len(server.requests)
    proc = check(swift(*sft_args(data, out), cwd=tmp_path, env=env))
    assert FETCHING in proc.output and len(weights_requested(server, before)) == 1  # rank 0 fetched them, once
    run = run_dir(out)
    report = report_of(out)
    assert report["model_identity"] == {"hub_revision": server.sha(REPO)}  # the snapshot's commit
    assert report["source_model"].endswith(f"snapshots/{server.sha(REPO)}")
    assert report["num_layers_before"] == 6 and report["num_layers_after"] < 6 and report["phase1"] is None
    checkpoint = run / "checkpoint-4"
    assert json.loads((checkpoint / "args.json").read_text())["model"] == str(run / "gradprune" / "model")
    assert (checkpoint / "adapter_model.safetensors").is_file()

    # Day two: a new learning rate and a longer run prune nothing again (the pruned model's inputs are the
    # model, the rows and the pruning options; none changed).
    before = len(server.requests)
    proc = check(swift(*sft_args(data, out, "--learning_rate", "3e-4", steps=6), cwd=tmp_path, env=env))
    assert REUSED in proc.output and "[GradPruner] prune step" not in proc.output
    assert not weights_requested(server, before)  # already in the cache: nothing downloaded again
    second = run_dir(out)
    weights = [r / "gradprune" / "model" / "model.safetensors" for r in (run, second)]
    assert weights[0].stat().st_ino == weights[1].stat().st_ino  # hard links of the first run's model
    assert (second / "checkpoint-6" / "adapter_model.safetensors").is_file()


def test_hugging_face_id_with_the_papers_method_and_on_two_ranks(hub, tmp_path):
    server, root, data = hub
    env = {**server.env(tmp_path / "cache"), "USE_HF": "1"}
    paper = ("--gradprune_score", "squared", "--gradprune_merge_layers", "1", "--gradprune_prune_layers", "2",
             "--gradprune_steps", "3", "--lora_dropout", "0")  # fmt: skip
    proc = check(swift(*sft_args(data, tmp_path / "paper", *paper), cwd=tmp_path, env=env))
    report = report_of(tmp_path / "paper")
    assert "[GradPruner] phase 1 done" in proc.output and report["phase1"]["steps_captured"] == 3
    assert len(report["merged_layers"]) == 1 and report["num_layers_after"] == 4

    # Two ranks, the defaults, a fresh cache: rank 0 downloads the weights, every rank trains the pruned model.
    two = {**server.env(tmp_path / "cache2"), "USE_HF": "1", "NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    before = len(server.requests)
    out = tmp_path / "two"
    proc = check(swift(*sft_args(data, out, "--use_cpu", "true"), cwd=tmp_path, env=two))
    assert proc.output.count(FETCHING) == 1 and len(weights_requested(server, before)) == 1
    report = report_of(out)
    assert report["model_identity"] == {"hub_revision": server.sha(REPO)}
    assert (run_dir(out) / "checkpoint-4" / "adapter_model.safetensors").is_file()


def test_modelscope_id_with_the_defaults(hub, tmp_path):
    """swift's default hub (USE_HF unset): its cache folder names the revision asked for (``master``), not a
    commit, so the model is identified by its files, taken after rank 0 downloaded the weights."""
    server, root, data = hub
    env = {**server.env(tmp_path / "cache"), "USE_HF": "0"}
    out = tmp_path / "out"
    before = len(server.requests)
    proc = check(swift(*sft_args(data, out), cwd=tmp_path, env=env))
    assert FETCHING in proc.output
    assert [r for r in server.requests[before:] if "FilePath=model.safetensors" in r]
    identity = report_of(out)["model_identity"]
    assert set(identity) == {"config.json", "model.safetensors"}  # the weights were there when it was taken
    proc = check(swift(*sft_args(data, out, "--learning_rate", "3e-4"), cwd=tmp_path, env=env))
    assert REUSED in proc.output  # the second run's key is the first's: its files are the same


def test_the_qwen2_5_7b_example_as_typed_with_the_default_criterion(hub, tmp_path):
    """examples/yaml/qwen2_5_7b_lora.yaml without its merge line is the default criterion with use_hf: true;
    a tiny Qwen2 is served under its model ID, and only what a CPU cannot take is overridden."""
    server, root, data = hub
    config = yaml.safe_load((TESTS.parent / "examples" / "yaml" / "qwen2_5_7b_lora.yaml").read_text())
    del config["gradprune_merge_layers"]
    config_file = tmp_path / "qwen.yaml"
    config_file.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    cpu = ["--dataset", str(data), "--torch_dtype", "float32", "--num_train_epochs", "1", "--max_steps", "4",
           "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_length", "256",
           "--gradient_checkpointing", "false", "--dataloader_num_workers", "0", "--check_model", "false",
           "--report_to", "none", "--output_dir", str(out), "--save_steps", "4",
           "--gradprune_benchmark", "false"]  # fmt: skip
    proc = check(swift("sft", str(config_file), *cpu, cwd=tmp_path, env={**server.env(tmp_path / "cache")}))
    assert f"[GradPruner] fetching the weights of {QWEN}" in proc.output
    report = report_of(out)
    assert report["num_layers_before"] - report["num_layers_after"] == 2  # round(0.4 x 6)
    assert report["config"]["score"] == "block_influence" and report["phase1"] is None
    checkpoint = run_dir(out) / "checkpoint-4"
    args = json.loads((checkpoint / "args.json").read_text())
    assert (args["model_type"], args["template"]) == ("qwen2", "qwen2_5")  # swift matched the ID's metadata
    assert AutoModelForCausalLM.from_pretrained(run_dir(out) / "gradprune" / "model").config.num_hidden_layers == 4
