"""End to end: `swift sft ... --gradprune true` in a subprocess, as a user runs it (minutes on CPU)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

import reference
from swift_gradpruner.demo import offline_env
from swift_gradpruner.tiny import create_tiny
from swift_run import COMMON, TESTS, check, free_port, logged_losses, report_of, run_dir, swift

pytestmark = pytest.mark.slow

REPORT_KEYS = {
    "config", "steps", "layer_scores", "linear_scores", "dropped_layers", "merged_layers", "kept_layers",
    "merged_fraction", "num_layers_before", "num_layers_after", "params_before", "params_after",
    "params_removed_fraction", "phase1", "config_hash", "source_model",
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    llama, data = create_tiny(root / "llama", "llama", num_layers=6, rows=256)
    qwen2, _ = create_tiny(root / "qwen2", "qwen2", num_layers=6, rows=16)
    return {"root": root, "llama": llama, "qwen2": qwen2, "data": data}


def test_lora_run_end_to_end(tiny, tmp_path):
    """LoRA run with gradient accumulation 2: pruned model, report, phase-2 adapter, infer, export.

    A second, independent callback records p.grad at every phase-1 optimizer step; the scores in
    the report must equal the brute-force IGIA of those recorded gradients.
    """
    record = tmp_path / "grads"
    record.mkdir()
    out = tmp_path / "out"
    proc = check(swift(
        "sft", "--model", str(tiny["llama"]), "--model_type", "llama", "--dataset", str(tiny["data"]), *COMMON,
        "--tuner_type", "lora", "--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-3",
        "--max_steps", "10", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
        "--max_grad_norm", "0", "--save_steps", "10", "--output_dir", str(out),
        "--external_plugins", str(TESTS / "plugins" / "grad_recorder.py"), "--callbacks", "grad_recorder",
        "--gradprune", "true", "--gradprune_prune_layers", "2", "--gradprune_merge_layers", "1",
        "--gradprune_steps", "4", "--gradprune_keep_state", "true",
        cwd=tmp_path, env={"GRAD_RECORD_DIR": str(record)},
    ))  # fmt: skip
    run = run_dir(out)
    pruned = run / "gradprune" / "model"
    report = report_of(out)
    assert set(report) >= REPORT_KEYS
    assert json.loads((pruned / "config.json").read_text())["num_hidden_layers"] == 4
    assert report["num_layers_after"] == 4 and len(report["dropped_layers"]) == 1 and len(report["merged_layers"]) == 1
    assert report["steps"] == {"used": 4, "skipped_nonfinite": 0, "zero": 1}  # LoRA B = 0 at the first step
    assert report["phase1"]["steps_captured"] == 4 and report["phase1"]["total_steps"] == 10
    assert "[GradPruner] removed 2 of 6 layers" in proc.output
    guard = report["quality_guard"]  # 32 of the 256 rows were held out of phase 1 and measured
    assert guard["rows"] == 32 and guard["dense_loss"] > 0 and set(guard["kls"]) == {"2"}
    assert guard["kl"] == guard["kls"]["2"] > 0 and guard["tokens"] > guard["rows"]
    assert "quality guard on 32 held-out rows: KL" in proc.output
    timing = report["inference_benchmark"]  # dense and pruned timed in alternating rounds; no speed asserted
    assert (timing["device"], timing["dtype"], timing["backend"]) == ("cpu", "float32", "transformers")
    decode = timing["workloads"]["decode"]
    assert decode["workload"]["new_tokens"] == 32 and len(decode["dense"]["values"]) == len(decode["pruned"]["values"])
    assert decode["dense_tokens_per_s"] == pytest.approx(32 / decode["dense"]["median"])
    assert "decode time: pruned" in proc.output.split("[GradPruner] removed 2 of 6 layers")[1].splitlines()[0]
    assert report["whole_run"]["ratio_source"] == "measured: prefill on cpu"  # the timing's step ratio
    assert report["whole_run"]["step_ratio"] == timing["workloads"]["prefill"]["ratio"]
    assert len(list((run / "gradprune" / "state").glob("step-*.safetensors"))) == 4  # --gradprune_keep_state true

    # Capture correctness: 4 optimizer steps of 2 micro-batches each were recorded independently.
    steps = [torch.load(p) for p in sorted(record.glob("step*.pt"))]
    assert len(steps) == 4
    recorded = [_pairs(step) for step in steps]
    expected = {name: float(f.sum()) for name, f in reference.igia(recorded).items()}
    assert set(expected) == set(report["linear_scores"])
    for name, value in report["linear_scores"].items():
        assert value == pytest.approx(expected[name], rel=1e-5), name

    # Phase 2 produced an ordinary swift LoRA checkpoint on top of the pruned model.
    checkpoint = run / "checkpoint-10"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert json.loads((checkpoint / "args.json").read_text())["model"] == str(pruned)
    losses = logged_losses(run)
    assert len(losses) == 10 and all(loss == loss for loss in losses)

    # swift infer and swift export find the pruned base through the checkpoint alone.
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"messages": [{"role": "user", "content": "What is 2 plus 3?"}]}) + "\n")
    answers = tmp_path / "answers.jsonl"
    check(swift("infer", "--adapters", str(checkpoint), "--val_dataset", str(questions), "--max_new_tokens", "8",
                "--temperature", "0", "--result_path", str(answers), cwd=tmp_path))  # fmt: skip
    response = json.loads(answers.read_text().splitlines()[0])["response"]
    merged = tmp_path / "merged"
    check(swift("export", "--adapters", str(checkpoint), "--merge_lora", "true", "--output_dir", str(merged),
                cwd=tmp_path))  # fmt: skip
    assert response == greedy_answer(merged, "What is 2 plus 3?", 8)  # swift infer = transformers, token for token
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    prompt = torch.tensor([[5, 6, 7, 8]])
    out_ids = model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=True)
    assert out_ids.shape == (1, 9)


def greedy_answer(model_dir: Path, question: str, new_tokens: int) -> str:
    """transformers' greedy answer with the checkpoint's own chat template (ChatML, as swift's template)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)  # fmt: skip
    out = model.generate(**prompt, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)


def _pairs(named_grads: dict) -> dict:
    """peft parameter names -> {linear name: (gA, gB)}."""
    pairs: dict = {}
    for name, grad in named_grads.items():
        match = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.default\.weight", name)
        linear, which = match.groups()
        pairs.setdefault(linear, {})[which] = grad
    return {linear: (ab["A"], ab["B"]) for linear, ab in pairs.items()}


def test_full_run_from_yaml_then_rerun_and_resume(tiny, tmp_path):
    """`swift sft config.yaml` with full fine-tuning; a repeated run reuses phase 1 and resumes phase 2."""
    out = tmp_path / "out"
    config = {
        "model": str(tiny["qwen2"]), "model_type": "qwen2", "template": "chatml", "dataset": str(tiny["data"]),
        "check_model": False, "torch_dtype": "float32", "fp16": False, "dataloader_num_workers": 0,
        "report_to": "none", "tuner_type": "full", "learning_rate": 1e-4, "max_steps": 8, "save_steps": 4,
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "logging_steps": 1,
        "output_dir": str(out), "gradprune": True, "gradprune_prune_ratio": 0.3, "gradprune_merge_layers": 1,
        "gradprune_steps": 3, "gradprune_merge_mode": "fisher", "gradprune_benchmark": False,
        "gradprune_score": "squared",  # the paper's ranking: the merged layer has a retained one before it
    }  # fmt: skip
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(config))
    check(swift("sft", str(config_file), cwd=tmp_path))
    first = run_dir(out)
    report = report_of(out)
    removed = report["num_layers_before"] - report["num_layers_after"]
    assert removed >= 2 and len(report["merged_layers"]) == 1
    assert report["config"]["merge_mode"] == "fisher" and report["phase1"]["lora_rank"] == 8  # GradPruner's
    assert "inference_benchmark" not in report
    assert (first / "gradprune" / "state" / "igia_state.json").is_file()
    assert not list((first / "gradprune" / "state").glob("step-*"))  # item 8: a merge read them, then deleted
    checkpoint = first / "checkpoint-8"
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert model.config.num_hidden_layers == 6 - removed
    assert model.config.layer_types == ["full_attention"] * (6 - removed)

    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"messages": [{"role": "user", "content": "Spell stone backwards."}]}) + "\n")
    answers = tmp_path / "answers.jsonl"
    check(swift("infer", "--model", str(checkpoint), "--val_dataset", str(questions), "--max_new_tokens", "8",
                "--temperature", "0", "--result_path", str(answers), cwd=tmp_path))  # fmt: skip
    response = json.loads(answers.read_text().splitlines()[0])["response"]
    assert response == greedy_answer(checkpoint, "Spell stone backwards.", 8)

    # The same command again, resuming phase 2 from its step-4 checkpoint: phase 1 is not redone.
    proc = check(swift("sft", str(config_file), "--resume_from_checkpoint", str(first / "checkpoint-4"), cwd=tmp_path))
    second = run_dir(out)
    assert second != first and not (second / "gradprune" / "state").exists()
    reused = "reusing the pruned model of an earlier run with the same settings: "
    assert f"{reused}{first / 'gradprune' / 'model'} (hard-linked (no extra disk) into {second}" in proc.output
    state = json.loads((second / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8 and len(logged_losses(second)) == 4  # steps 5..8 only
    # Item 7: v1's checkpoints name v1's own copy (hard links) of the pruned model, not v0's.
    own = second / "gradprune" / "model"
    assert json.loads((second / "checkpoint-8" / "args.json").read_text())["model"] == str(own)
    weights = "model.safetensors"
    assert (own / weights).stat().st_ino == (first / "gradprune" / "model" / weights).stat().st_ino

    # Different GradPruner settings cannot resume a checkpoint trained on another pruned model.
    proc = swift("sft", str(config_file), "--gradprune_topp", "0.5", "--resume_from_checkpoint",
                 str(first / "checkpoint-4"), cwd=tmp_path)  # fmt: skip
    assert proc.returncode != 0
    assert "[GradPruner] error: --resume_from_checkpoint" in proc.output
    assert sorted(p.name for p in out.iterdir()) == sorted([first.name, second.name])

    # Issue 24 item 4: --resume_only_model (the weights of checkpoint-4, a fresh optimizer) works too.
    proc = check(swift("sft", str(config_file), "--resume_from_checkpoint", str(first / "checkpoint-4"),
                       "--resume_only_model", "true", cwd=tmp_path))  # fmt: skip
    assert f"{reused}{first / 'gradprune' / 'model'}" in proc.output
    third = run_dir(out)
    assert json.loads((third / "checkpoint-8" / "args.json").read_text())["resume_only_model"] is True
    assert AutoModelForCausalLM.from_pretrained(third / "checkpoint-8").config.num_hidden_layers == 6 - removed

    import shutil

    shutil.rmtree(first)  # deleting v0 orphans nothing: v1's checkpoint still loads on its base
    assert AutoModelForCausalLM.from_pretrained(second / "checkpoint-8").config.num_hidden_layers == 6 - removed


def test_default_run_resumes_when_only_phase_2_changes_and_refuses_other_base_weights(tiny, tmp_path):
    """Issue 33, the defaults (no phase 1): a resume that extends --max_steps goes on; one after only a
    package-version change goes on with one line; one after the base weights were replaced by a same-size
    file is refused, naming the file, before anything is loaded."""
    import shutil

    from swift_gradpruner.tiny import build_model

    model = tmp_path / "model"
    shutil.copytree(tiny["llama"], model)
    out = tmp_path / "out"
    common = ["sft", "--model", str(model), "--model_type", "llama", "--dataset", str(tiny["data"]), *COMMON,
              "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--save_steps", "2",
              "--output_dir", str(out), "--gradprune", "true", "--gradprune_prune_layers", "2",
              "--gradprune_benchmark", "false"]  # fmt: skip
    check(swift(*common, "--max_steps", "4", cwd=tmp_path))
    first = run_dir(out)
    reused = "reusing the pruned model of an earlier run with the same settings"
    proc = check(swift(*common, "--max_steps", "6", "--learning_rate", "3e-4", "--resume_from_checkpoint",
                       str(first / "checkpoint-4"), cwd=tmp_path))  # fmt: skip
    second = run_dir(out)
    assert reused in proc.output and "[GradPruner] prune step" not in proc.output
    state = json.loads((second / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and len(logged_losses(second)) == 2  # steps 5 and 6 only

    pruned = first / "gradprune" / "model"
    report = json.loads((pruned / "gradprune_report.json").read_text())
    report["versions"]["transformers"] = "5.18.0"  # as if the model was made before an upgrade
    (pruned / "gradprune_report.json").write_text(json.dumps(report))
    proc = check(swift(*common, "--max_steps", "4", "--resume_from_checkpoint", str(first / "checkpoint-2"),
                       cwd=tmp_path))  # fmt: skip
    lines = [line for line in proc.output.splitlines() if "with other package versions" in line]
    assert len(lines) == 1 and "versions transformers '5.18.0' then" in lines[0], proc.output[-3000:]

    weights = model / "model.safetensors"
    size = weights.stat().st_size
    vocab = AutoModelForCausalLM.from_pretrained(model).config.vocab_size
    build_model("llama", 6, vocab_size=vocab, seed=7).save_pretrained(tmp_path / "other")
    shutil.copyfile(tmp_path / "other" / "model.safetensors", weights)
    assert weights.stat().st_size == size
    runs = sorted(out.iterdir())
    proc = swift(*common, "--max_steps", "6", "--resume_from_checkpoint", str(first / "checkpoint-4"), cwd=tmp_path)
    assert proc.returncode != 0
    errors = [line for line in proc.output.splitlines() if line.startswith("[GradPruner] error:")]
    assert len(errors) == 1 and "model model.safetensors" in errors[0], proc.output[-3000:]
    assert sorted(out.iterdir()) == runs  # refused before anything was written


def test_auto_skip_loss_then_reprune_from_the_saved_phase_1(tiny, tmp_path, capsys):
    """prune_layers=auto with the paper's ranking: the largest count (up to prune_ratio's) within the guard's
    threshold. The same command with other pruning options prunes again from the saved phase-1 state without
    training phase 1; the removal-damage criterion (no phase 1) prepares the same held-out rows itself; a
    tight threshold warns and still trains; `gradprune prune --state` re-prunes outside swift."""
    out = tmp_path / "runs"
    common = ["sft", "--model", str(tiny["llama"]), "--model_type", "llama", "--dataset", str(tiny["data"]), *COMMON,
              "--max_steps", "6", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
              "--save_steps", "6", "--gradprune", "true", "--gradprune_steps", "3", "--gradprune_benchmark", "false",
              "--gradprune_calibration_rows", "8", "--output_dir", str(out)]  # fmt: skip
    auto = [
        "--gradprune_prune_layers",
        "auto",
        "--gradprune_prune_ratio",
        "0.5",
        "--gradprune_max_kl",
        "1e3",
    ]
    proc = check(swift(*common, *auto, "--gradprune_score", "squared", cwd=tmp_path))
    first = run_dir(out)
    report = report_of(out)
    assert report["num_layers_before"] - report["num_layers_after"] == 3  # the ceiling: 50% of 6 layers
    assert report["config"]["score"] == "squared"
    assert report["quality_guard"]["ok"] and "[GradPruner] WARNING: pruned-model loss" not in proc.output
    assert "[GradPruner] phase 1 done" in proc.output
    state = first / "gradprune" / "state"
    assert (state / "igia_state.json").is_file() and (state / "batches.safetensors").is_file()
    assert not list(state.glob("step-*.safetensors"))  # item 8: nothing merges, nothing reads the factors

    tight = ["--gradprune_prune_layers", "4", "--gradprune_merge_layers", "0", "--gradprune_max_kl", "0"]
    proc = check(swift(*common, *tight, "--gradprune_score", "norm", cwd=tmp_path))
    second = run_dir(out)
    assert second != first and f"pruning from {state}" in proc.output
    assert "[GradPruner] phase 1 done" not in proc.output and not (second / "gradprune" / "state").exists()
    guard = report_of(out)["quality_guard"]
    assert report_of(out)["num_layers_after"] == 2 and report_of(out)["phase1_key"] == report["phase1_key"]
    assert not guard["ok"] and guard["kl"] > 0  # any removal moves the predictions: over a threshold of 0
    assert "[GradPruner] WARNING: pruned model's predictions on 32 held-out training rows" in proc.output
    assert (second / "checkpoint-6").is_dir()

    proc = check(swift(*common, *tight, "--gradprune_score", "skip_loss", cwd=tmp_path))
    assert "[GradPruner] no phase 1" in proc.output and "[GradPruner] phase 1 done" not in proc.output
    criterion = report_of(out)["criterion"]
    assert criterion["name"] == "skip_loss" and len(criterion["loss_after_removal"]) == 4
    assert report_of(out)["rows_key"] == report["rows_key"]  # phase 1 held out the same rows

    from swift_gradpruner.cli import main

    again = tmp_path / "again"
    assert main(["prune", "--state", str(state), "--out", str(again), "--prune_layers", "1", "--score", "last",
                 "--merge_layers", "0", "--benchmark", "false"]) == 0  # fmt: skip
    redone = json.loads((again / "gradprune_report.json").read_text())
    assert redone["kept_layers"] == [0, 1, 2, 3, 5] and redone["quality_guard"]["rows"] == 32
    assert json.loads((again / "args.json").read_text())["model_type"] == "llama"
    assert AutoModelForCausalLM.from_pretrained(again).config.num_hidden_layers == 5
    assert main(["prune", "--state", str(tmp_path), "--out", str(tmp_path / "x")]) == 2  # not a state: one line

    # Item 1: the state belongs to the model phase 1 ran on; other weights (elsewhere or in place) are refused.
    import shutil

    from swift_gradpruner.tiny import build_model

    other = tmp_path / "other"
    shutil.copytree(tiny["llama"], other)
    build_model("llama", 6, vocab_size=AutoModelForCausalLM.from_pretrained(other).config.vocab_size,
                seed=1).save_pretrained(other)  # fmt: skip
    assert main(["prune", "--state", str(state), "--out", str(tmp_path / "o1"), "--model", str(other),
                 "--prune_layers", "1", "--score", "last", "--benchmark", "false"]) == 2  # fmt: skip
    assert "is not the model the state was made from" in capsys.readouterr().err and not (tmp_path / "o1").exists()


def test_gradprune_sft_command_needs_no_start_up_hook(tiny, tmp_path):
    """`gradprune sft` (swift's own launcher, GradPruner's entry file) with the .pth hook switched off;
    and `swift sft --gradprune` with the hook's patch made to miss (as if swift moved sft_main): a loud
    error from swift's parser, never a silent dense run."""
    off = tmp_path / "no_hook"
    off.mkdir()
    # sitecustomize runs after the .pth hook: it removes the import patch the hook installed.
    (off / "sitecustomize.py").write_text(
        "import sys\nsys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != '_PatchSftMain']\n"
    )
    env = {"PYTHONPATH": str(off)}
    args = ["--model", str(tiny["llama"]), "--model_type", "llama", "--dataset", str(tiny["data"]), *COMMON,
            "--max_steps", "4", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--save_steps", "4", "--gradprune_prune_layers", "2", "--gradprune_steps", "2",
            "--gradprune_benchmark", "false"]  # fmt: skip
    missed = swift("sft", *args, "--gradprune", "true", "--output_dir", str(tmp_path / "missed"), cwd=tmp_path, env=env)
    assert missed.returncode != 0 and "remaining_argv" in missed.output and "--gradprune" in missed.output
    assert not (tmp_path / "missed").exists() or not any((tmp_path / "missed").glob("v*/checkpoint-*"))

    import sys

    out = tmp_path / "cmd"
    gradprune = Path(sys.executable).with_name("gradprune")
    proc = subprocess.run([str(gradprune), "sft", *args, "--output_dir", str(out)], cwd=tmp_path,
                          env={**offline_env(), "MASTER_PORT": str(free_port()), **env}, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = report_of(out)
    assert report["num_layers_before"] - report["num_layers_after"] == 2
    assert (run_dir(out) / "checkpoint-4" / "adapter_model.safetensors").is_file()


def test_without_gradprune_swift_is_unchanged(tiny, tmp_path):
    """No flag: the start-up hook never engages; --gradprune false: swift's own run, the same losses."""
    runs = {}
    for variant, extra in (("plain", []), ("off", ["--gradprune", "false"])):
        out = tmp_path / variant
        proc = check(swift(
            "sft", "--model", str(tiny["llama"]), "--model_type", "llama", "--dataset", str(tiny["data"]), *COMMON,
            "--max_steps", "4", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--save_steps", "4", "--output_dir", str(out), *extra, cwd=tmp_path,
        ))  # fmt: skip
        run = run_dir(out)
        assert not (run / "gradprune").exists() and "GradPruner" not in proc.output
        assert (run / "checkpoint-4" / "adapter_model.safetensors").is_file()
        runs[variant] = logged_losses(run)
    assert len(runs["plain"]) == 4 and runs["plain"] == runs["off"]


BAD_INPUTS = [
    (["--gradprune_steps", "8", "--gradprune_score", "squared"], "gradprune steps=8 is invalid: must be < the run's 8"),
    (["--gradprune_prune_ratio", "1.5"], "gradprune prune_ratio=1.5 is invalid: must be in (0, 1)"),
    (["--gradprune_prune_ratio", "0.01"], "gradprune prune_ratio=0.01 is invalid for this model"),
    (["--gradprune_prune_layers", "2", "--gradprune_merge_layers", "3"], "gradprune merge_layers=3 is invalid"),
    (["--gradprune_prune_layers", "6"], "the model has 6 decoder layers, so it must be between 1 and 5"),
    (["--target_modules", "foo_proj"], "LoRA target modules 'foo_proj' match no linear layer"),
    (["--target_regex", r".*\.layers\.[45]\..*_proj", "--gradprune_score", "squared"],
     "adapt no linear of decoder layers 0-3 (of 0-5): their IGIA scores would be 0"),
    (["--gradprune_steps", "1"], "gradprune steps=1 is invalid: must be an integer >= 2"),
    (["--gradprune_steps", "2", "--gradprune_score", "norm"], "phase 1 would capture 2 optimizer steps, and with"),
    (["--cached_dataset", "@file"], "is not supported with --gradprune: GradPruner hashes"),
    (["--use_ray", "true"], "--use_ray is not supported with --gradprune"),
    (["@custom"], "GradPruner does not support model_type 'my_custom_lm'"),
    (["--gradprune_prune_layers", "auto", "--gradprune_guard_rows", "100"],
     "needs a training set of at least 400 rows; it has 256"),
    (["--gradprune_prune_layer", "2"], "unknown flag --gradprune_prune_layer; valid GradPruner flags"),
    (["--gradprune_topp", "abc"], "--gradprune_topp 'abc' is not a valid float"),
    (["--dataset", "./missing.jsonl"], "--dataset ./missing.jsonl: no such file"),
    (["--output_dir", "@file"], "is a file, not a folder; choose another --output_dir"),
    (["--dataset", "@badrows"], "reading the training rows failed: "),
    (["--gradprune_prune_layers", "most"], "gradprune prune_layers='most' is invalid: must be an integer >= 1 or auto"),
    (["--gradprune_score", "skip_loss", "--streaming", "true"], "a --streaming dataset cannot provide"),
    (["--gradprune_merge_mode", "sum"], "gradprune merge_mode='sum' is invalid: must be one of add, average, fisher"),
    (["--fsdp", "fsdp2"], "is not supported with --gradprune yet (FSDP shards the LoRA gradients"),
    (["--adapters", "@adapter"], "--adapters cannot be combined with --gradprune: adapters trained on the dense model"),
    (["@unsupported"], "GradPruner does not support model_type 'seed_oss'; supported: llama, mistral, qwen2, qwen3"),
    (["@quantised"], "cannot prune a pre-quantised checkpoint (config.json has quantization_config: gptq)"),
]  # fmt: skip


@pytest.mark.parametrize("extra, message", BAD_INPUTS, ids=[m[:40] for _, m in BAD_INPUTS])
def test_bad_input_fails_early_with_one_line_and_no_output_dir(tiny, tmp_path, extra, message):
    model, model_type = str(tiny["llama"]), "llama"
    if extra == ["@unsupported"]:
        model, model_type, extra = str(_unsupported(tiny["root"])), "seed_oss", []
    elif extra == ["@quantised"]:
        model, extra = str(_quantised(tiny["root"], tiny["llama"])), []
    elif extra == ["@custom"]:
        model, extra = str(_custom_code(tiny["root"], tiny["llama"])), []
    extra = [str(_adapter(tiny["root"], tiny["llama"])) if token == "@adapter" else token for token in extra]
    if "@file" in extra:
        (tmp_path / "a_file").write_text("not a folder")
        extra = [str(tmp_path / "a_file") if token == "@file" else token for token in extra]
    if "@badrows" in extra:  # exists, so only phase 1 (after the model is loaded) finds it unreadable
        (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json at all\n')
        extra = [str(tmp_path / "bad.jsonl") if token == "@badrows" else token for token in extra]
    out = tmp_path / "out"
    proc = swift("sft", "--model", model, "--model_type", model_type, "--dataset", str(tiny["data"]), *COMMON,
                 "--max_steps", "8", "--gradient_accumulation_steps", "1", "--output_dir", str(out),
                 "--gradprune", "true", *extra, cwd=tmp_path)  # fmt: skip
    assert proc.returncode != 0
    last = proc.output.strip().splitlines()[-1]
    assert last.startswith("[GradPruner] error: ") and message in last, proc.output[-3000:]
    assert "Traceback" not in proc.output
    assert not out.exists()
    assert "Train:" not in proc.output  # nothing was trained


def test_a_failed_phase_1_keeps_its_logs_and_names_them(tiny, tmp_path):
    """Item 13: the one line names the file with the full error, and phase 1's own logs stay beside it."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json at all\n')
    out = tmp_path / "out"
    proc = swift("sft", "--model", str(tiny["llama"]), "--model_type", "llama", "--dataset", str(bad), *COMMON,
                 "--max_steps", "8", "--gradient_accumulation_steps", "1", "--output_dir", str(out), "--gradprune",
                 "true", "--gradprune_score", "squared", cwd=tmp_path)  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.output
    last = proc.output.strip().splitlines()[-1]
    log = run_dir(out) / "gradprune" / "phase1" / "error.log"
    assert last.startswith("[GradPruner] error: phase 1 failed: ") and str(log.parent) in last, last
    assert "Traceback" in log.read_text() and "DatasetGenerationError" in log.read_text()
    assert not (run_dir(out) / "gradprune" / "state").exists()


def test_phase_1_without_usable_gradients_saves_nothing(tiny, tmp_path):
    """Item 4: with a learning rate of 0, LoRA B stays 0 and every captured gradient is zero: the run stops
    after phase 1 with one line, and no state is left to be reused."""
    out = tmp_path / "out"
    proc = swift("sft", "--model", str(tiny["llama"]), "--model_type", "llama", "--dataset", str(tiny["data"]),
                 *COMMON, "--max_steps", "8", "--gradient_accumulation_steps", "1", "--learning_rate", "0",
                 "--output_dir", str(out), "--gradprune", "true", "--gradprune_score", "squared",
                 "--gradprune_steps", "3", cwd=tmp_path)  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.output
    last = proc.output.strip().splitlines()[-1]
    assert last.startswith("[GradPruner] error: phase 1 captured 3 optimizer steps, of which 0 had non-zero"), last
    assert not out.exists()


def _custom_code(root: Path, source: Path) -> Path:
    """A model whose config names its own code (auto_map), as custom-architecture hub models do."""
    import shutil

    path = root / "custom"
    if not path.exists():
        shutil.copytree(source, path)
        config = json.loads((path / "config.json").read_text())
        config.update(model_type="my_custom_lm", auto_map={"AutoConfig": "configuration_my.MyConfig"})
        (path / "config.json").write_text(json.dumps(config))
        (path / "configuration_my.py").write_text(
            "from transformers import LlamaConfig\n\n\nclass MyConfig(LlamaConfig):\n    model_type = 'my_custom_lm'\n"
        )
    return path


def _unsupported(root: Path) -> Path:
    """A family swift trains and GradPruner does not prune (ByteDance Seed-OSS)."""
    path = root / "seed_oss"
    if not path.exists():
        from transformers import AutoConfig

        from swift_gradpruner.tiny import build_tokenizer

        tokenizer = build_tokenizer()
        config = AutoConfig.for_model(
            "seed_oss", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=4, pad_token_id=0, eos_token_id=2, bos_token_id=None,
        )  # fmt: skip
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def _adapter(root: Path, model_dir: Path) -> Path:
    path = root / "adapter"
    if not path.exists():
        from peft import LoraConfig, get_peft_model

        model = AutoModelForCausalLM.from_pretrained(model_dir)
        get_peft_model(model, LoraConfig(r=2, target_modules="all-linear")).save_pretrained(path)
    return path


def _quantised(root: Path, source: Path) -> Path:
    import shutil

    path = root / "quantised"
    if not path.exists():
        shutil.copytree(source, path)
        config = json.loads((path / "config.json").read_text())
        config["quantization_config"] = {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": 128,
            "desc_act": False,
        }
        (path / "config.json").write_text(json.dumps(config))
    return path


def test_examples_yaml_are_valid_swift_and_gradprune_configs():
    from dataclasses import fields

    from swift.arguments import SftArguments

    from swift_gradpruner.demo import TINY_CPU_YAML
    from swift_gradpruner.swift.args import parse_gradprune

    folder = TESTS.parent / "examples" / "yaml"
    files = sorted(folder.glob("*.yaml"))
    assert {f.name for f in files} >= {
        "tiny_cpu.yaml", "llama3_1_8b_lora.yaml", "llama3_1_8b_full.yaml", "qwen2_5_7b_lora.yaml",
        "mistral_7b_full.yaml",
    }  # fmt: skip
    swift_fields = {f.name for f in fields(SftArguments)}
    for file in files:
        config = yaml.safe_load(file.read_text())
        ours = {k: str(v) for k, v in config.items() if k.startswith("gradprune")}
        enabled, _ = parse_gradprune(ours)
        assert enabled, file.name
        unknown = set(config) - set(ours) - swift_fields - {"ENV"}
        assert not unknown, f"{file.name}: not swift arguments: {unknown}"
    assert (folder / "tiny_cpu.yaml").read_text() == TINY_CPU_YAML


@pytest.mark.parametrize("name, merged", [("llama3_1_8b_lora", 3), ("llama3_1_8b_full", 3), ("mistral_7b_full", 2)])
def test_paper_yaml_hold_the_papers_settings(name, merged):
    """The paper-reproduction examples keep App. C.2's values and the paper's own ranking (Eq. 4),
    whatever the plugin's defaults become."""
    from swift_gradpruner.swift.args import parse_gradprune

    config = yaml.safe_load((TESTS.parent / "examples" / "yaml" / f"{name}.yaml").read_text())
    _, gradprune = parse_gradprune({k: str(v) for k, v in config.items() if k.startswith("gradprune")})
    assert (gradprune.score, gradprune.prune_layers, gradprune.merge_layers) == ("squared", 13, merged)
    assert (gradprune.topp, gradprune.merge_mode, gradprune.step_ratio) == (0.2, "add", 0.01)
    assert float(config["learning_rate"]) == 1e-5 and config["num_train_epochs"] == 3
    gpus = 8 if config.get("deepspeed") else 1  # the full-FT files are written for 8 GPUs
    assert config["per_device_train_batch_size"] * config["gradient_accumulation_steps"] * gpus == 64
