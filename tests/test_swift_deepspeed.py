"""Under DeepSpeed ZeRO-2/ZeRO-3 (gradients sharded) the scores equal those of a plain run.

CPU, gloo, one process (two ranks, where gradients and parameters really are split: test_multirank.py).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
from safetensors import safe_open

from swift_gradpruner.tiny import create_tiny
from swift_run import COMMON, TESTS, assert_same_scores, check, report_of, run_dir, swift

PLUGINS = TESTS / "plugins"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    model, data = create_tiny(root / "llama", "llama", num_layers=6, rows=128)

    def run(name: str, *extra: str, batch: int = 2, accumulation: int = 2, env: dict | None = None) -> dict:
        """The report of run ``name`` (made once per module)."""
        out = root / name
        if name in run.outputs:
            return report_of(out)
        run.outputs[name] = check(swift(
            "sft", "--model", str(model), "--model_type", "llama", "--dataset", str(data), *COMMON,
            "--tuner_type", "lora", "--lora_dropout", "0", "--max_steps", "6", "--save_steps", "6",
            "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", str(accumulation),
            "--output_dir", str(out), "--gradprune", "true", "--gradprune_prune_layers", "2",
            "--gradprune_merge_layers", "1", "--gradprune_steps", "4", *extra,
            cwd=root, env={"NPROC_PER_NODE": "1", **(env or {})},
        )).output  # fmt: skip
        return report_of(out)

    run.outputs = {}
    run.root = root
    return run


def test_zero2_and_zero3_runs_match_a_plain_run(runs):
    plain = runs("plain")
    assert plain["phase1"]["deepspeed"] is False
    released = "[GradPruner] phase 1 released its trainer, model, optimizer, lr scheduler"
    assert released in runs.outputs["plain"]
    for stage in ("zero2", "zero3"):
        report = runs(stage, "--deepspeed", stage)
        assert report["phase1"]["deepspeed"] is True
        assert_same_scores(report, plain)
        lines = [line for line in runs.outputs[stage].splitlines() if "[GradPruner] phase 1 " in line]
        # accelerate's free_memory destroyed the engine and (ZeRO-3) DeepSpeed's class-level lru_cache that
        # held every coordinator was cleared: nothing of phase 1 is left.
        assert any(f"{released}, DeepSpeed engine" in line for line in lines), lines
    # Two ranks (gradients and parameters really split, the streaming surgery under two-rank ZeRO-3, the
    # default criterion with epochs): tests/test_multirank.py.


def test_zero3_offload_and_a_loss_scale_match_a_plain_run(runs):
    """swift's zero3_offload (optimizer and parameters offloaded to CPU) and a loss scale of 1024 that
    DeepSpeed multiplies into backward and takes out in step: the capture must divide it out, else
    every F would be 1024**4 times too large."""
    plain = runs("plain")
    assert_same_scores(runs("zero3_offload", "--deepspeed", "zero3_offload"), plain)
    assert "offload_param" in runs.outputs["zero3_offload"]
    released = "phase 1 released its trainer, model, optimizer, lr scheduler, DeepSpeed engine"
    assert released in runs.outputs["zero3_offload"]
    for stage in ("zero2", "zero3"):
        name = f"{stage}_loss_scale"
        report = runs(name, "--deepspeed", stage, "--external_plugins", str(PLUGINS / "static_loss_scale.py"),
                      "--callbacks", "static_loss_scale", env={"GRADPRUNE_TEST_LOSS_SCALE": "1024"})  # fmt: skip
        assert "loss scale = 1024.0" in runs.outputs[name]
        assert_same_scores(report, plain)


def relative_gap(scores, reference) -> float:
    """Largest |score / reference - 1| over the entries of two score dicts or lists."""
    if isinstance(reference, dict):
        return max(abs(scores[name] / value - 1) for name, value in reference.items())
    return max(abs(a / b - 1) for a, b in zip(scores, reference))


def test_bf16_phase1_with_and_without_deepspeed(runs):
    """bf16 weights and compute (CPU supports it): a plain run, ZeRO-2 and ZeRO-3 capture the same
    scores within bf16's precision and choose the same layers; phase 2 trains the result in bf16.

    The tolerance is bf16's own error on these scores, measured here: the gap between the plain
    bf16 run and the fp32 run. A ZeRO run computes the same bf16 numbers in another reduction order,
    so its gap to the plain bf16 run stays within that error; a factor 2 leaves room for another
    machine's kernels. Seen on this project's 2-core CPU (each run repeated 5 times: every run was
    bit-identical to its repeats): per linear, bf16 vs fp32 up to 8.7%, ZeRO-2 vs bf16 0.8%, ZeRO-3
    vs bf16 5.8% (one v_proj; the old fixed 5% failed on it); per layer (7 linears summed) 1.5%,
    0.3% and 1.5%. The ZeRO runs use a DeepSpeed loss scale of 1024 (test plugin), so a capture that
    forgets to divide it out is off by 1024**2 and fails, as does a gather that misses gradients.
    """
    bf16 = ("--torch_dtype", "bfloat16", "--bf16", "true", "--use_cpu", "true")
    plain, fp32 = runs("bf16", *bf16), runs("plain")
    assert plain["phase1"]["deepspeed"] is False
    linear_error = relative_gap(plain["linear_scores"], fp32["linear_scores"])
    layer_error = relative_gap(plain["layer_scores"], fp32["layer_scores"])
    assert 0 < linear_error < 0.25 and layer_error < 0.05  # bf16 really differs from fp32, and not by much
    for stage in ("zero2", "zero3"):
        name = f"bf16_{stage}"
        report = runs(name, *bf16, "--deepspeed", stage, "--external_plugins", str(PLUGINS / "static_loss_scale.py"),
                      "--callbacks", "static_loss_scale", env={"GRADPRUNE_TEST_LOSS_SCALE": "1024"})  # fmt: skip
        assert "loss scale = 1024.0" in runs.outputs[name]
        assert report["phase1"]["deepspeed"] is True
        assert report["steps"] == plain["steps"] == {"used": 4, "skipped_nonfinite": 0, "zero": 1}
        linear_gap = relative_gap(report["linear_scores"], plain["linear_scores"])
        layer_gap = relative_gap(report["layer_scores"], plain["layer_scores"])
        print(f"bf16 {stage}: linear gap {linear_gap:.4f} (bf16 vs fp32 {linear_error:.4f}), layer gap {layer_gap:.4f} "
              f"(bf16 vs fp32 {layer_error:.4f})")  # fmt: skip
        assert linear_gap <= 2 * linear_error and layer_gap <= 2 * layer_error, stage
        assert (report["dropped_layers"], report["merged_layers"]) == (plain["dropped_layers"], plain["merged_layers"])
    for name in ("bf16", "bf16_zero2", "bf16_zero3"):
        model = run_dir(runs.root / name) / "gradprune" / "model"
        with safe_open(str(model / "model.safetensors"), "pt") as f:
            # The pruned checkpoint keeps the dense checkpoint's dtype (float32 on disk here), whatever the
            # training dtype; phase 2 loads it with the user's --torch_dtype, as phase 1 did.
            assert {f.get_slice(key).get_dtype() for key in f.keys()} == {"F32"}, name  # noqa: SIM118
        checkpoint = run_dir(runs.root / name) / "checkpoint-6"
        assert (checkpoint / "adapter_model.safetensors").is_file(), name
        assert json.loads((checkpoint / "args.json").read_text())["torch_dtype"] == "bfloat16", name
