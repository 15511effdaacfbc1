"""Issue 18 end to end (`swift sft --gradprune true` in a subprocess): no phase 1 when nothing reads its
gradients, the held-out rows never come from phase 2's validation split, the whole run timed against a
dense run, and a re-run with other pruning options into the same folder leaves the earlier
checkpoints on their own base model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from swift_gradpruner.config import GradPruneConfig
from swift_gradpruner.swift.holdout import load_batches
from swift_gradpruner.tiny import create_tiny
from swift_run import COMMON, check, swift

pytestmark = pytest.mark.slow


def unique_rows(path: Path, count: int) -> Path:
    """Chat rows whose questions are all different, so that a row can be recognised by its question."""
    with path.open("w") as f:
        for i in range(count):
            a, b = divmod(i, 16)
            question = f"What is {a + 2} times {b + 3}?"
            answer = f"{a + 2} times {b + 3} is {(a + 2) * (b + 3)}."
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def questions_in(batches: list[dict], tokenizer) -> list[str]:
    out = []
    for batch in batches:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            text = tokenizer.decode(ids[mask.bool()])
            out += re.findall(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", text)
    return out


def test_no_phase1_when_nothing_reads_gradients_and_checkpoints_keep_their_base(tmp_path):
    assert not GradPruneConfig().needs_gradients  # the default criterion reads no gradients and nothing merges
    model, _ = create_tiny(tmp_path / "tiny", "llama", num_layers=6, rows=8)
    data = unique_rows(tmp_path / "train.jsonl", 256)
    out = tmp_path / "out"
    common = ["sft", "--model", str(model), "--model_type", "llama", "--dataset", str(data), *COMMON,
              "--max_steps", "6", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
              "--split_dataset_ratio", "0.1", "--add_version", "false", "--output_dir", str(out),
              "--gradprune", "true", "--gradprune_benchmark", "false"]  # fmt: skip
    proc = check(swift(*common, "--save_steps", "3", "--gradprune_prune_layers", "2", cwd=tmp_path))

    # Item 6: the guard and calibration rows are training rows, never phase 2's validation rows.
    tokenizer = AutoTokenizer.from_pretrained(model)
    batches = load_batches(out / "gradprune" / "rows" / "batches.safetensors")
    held = questions_in(batches["guard"] + batches["calibration"], tokenizer)
    rows = [json.loads(line)["messages"][0] for line in (out / "val_dataset.jsonl").open()]
    validation = [json.loads(row)["content"] for row in rows]  # swift writes each message as a JSON string
    assert len(held) == 32 + 16 and len(validation) == 25
    assert not set(held) & set(validation)

    # Lean: no phase 1, no gradient factors anywhere; the whole run against a dense estimate.
    assert "[GradPruner] no phase 1" in proc.output and "phase 1 done" not in proc.output
    assert not list(out.rglob("step-*.safetensors")) and not (out / "gradprune" / "phase1").exists()
    assert "too short for pruning to pay off" in proc.output  # 6 steps cannot pay for the criterion
    last = [line for line in proc.output.splitlines() if "[GradPruner]" in line][-1]
    assert "[GradPruner] whole run" in last and "estimated dense run" in last
    report = json.loads((out / "gradprune" / "model" / "gradprune_report.json").read_text())
    whole = report["whole_run"]
    assert whole["ratio"] == pytest.approx(whole["total_s"] / whole["dense_estimate_s"])
    assert whole["step_ratio"] == report["kept_compute_fraction"] < 1  # no timing: the FLOP fraction kept
    assert {"held-out rows", "choosing layers (criterion, guard)"} <= set(whole["stages_s"])
    assert report["phase1"] is None and report["steps"]["used"] == 0

    # Item 7 (--add_version false): other pruning options must not replace the model checkpoint-3 names.
    (out / "gradprune" / ".model.killed.tmp").mkdir()  # item 8: what a killed save leaves behind
    proc = check(swift(*common, "--save_steps", "6", "--gradprune_prune_layers", "3", cwd=tmp_path))
    # Without phase 1 every run prepares its rows (the rows key is their hash): the same rows as the first run's.
    assert "[GradPruner] no phase 1" in proc.output and "reusing the pruned model" not in proc.output
    assert not list((out / "gradprune").glob(".model*"))
    first = Path(json.loads((out / "checkpoint-3" / "args.json").read_text())["model"])
    second = Path(json.loads((out / "checkpoint-6" / "args.json").read_text())["model"])
    assert first == out / "gradprune" / "model" and second.parent == first.parent and second != first
    assert json.loads((second / "gradprune_report.json").read_text())["rows_key"] == report["rows_key"]
    assert AutoConfig.from_pretrained(first).num_hidden_layers == 4
    assert AutoModelForCausalLM.from_pretrained(second).config.num_hidden_layers == 3
