"""The README's main command: `gradprune demo` runs a real swift sft GradPruner run offline."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from swift_gradpruner.demo import offline_env

pytestmark = pytest.mark.slow


def test_demo_end_to_end_and_again(tmp_path):
    """The README's commands as typed: the demo (twice), then `swift sft examples/yaml/tiny_cpu.yaml`."""
    proc = _demo(tmp_path)
    root = tmp_path / "gradprune_demo"
    assert yaml.safe_load((root / "tiny_cpu.yaml").read_text())["gradprune"] is True
    (run,) = (root / "output").glob("v*")
    pruned = run / "gradprune" / "model"
    report = json.loads((pruned / "gradprune_report.json").read_text())
    # Defaults: 40% of the decoder-layer parameters -> 3 of the 8 layers (3.2 rounds to 3), none merged.
    assert report["num_layers_before"] == 8 and report["num_layers_after"] == 5
    assert report["decoder_params_removed_fraction"] == pytest.approx(3 / 8)
    assert report["merged_layers"] == {} and report["config"]["score"] == "block_influence"
    assert report["quality_guard"]["rows"] == 32
    assert AutoModelForCausalLM.from_pretrained(pruned).config.num_hidden_layers == 5
    assert (run / "checkpoint-150" / "adapter_model.safetensors").is_file()
    answers = [json.loads(line) for line in (run / "demo_answers.jsonl").read_text().splitlines()]
    assert len(answers) == 3 and all(isinstance(a["response"], str) for a in answers)
    assert f"pruned model     : {pruned.relative_to(tmp_path)}" in proc.stdout
    assert "A: " in proc.stdout
    assert "inference on cpu (transformers, float32): decode time: pruned" in proc.stdout

    # The README command run a second time: the pruned model is reused (hard-linked into the new version
    # folder, which its checkpoints name), phase 2 runs again.
    again = _demo(tmp_path)
    second = max((root / "output").glob("v*"), key=lambda p: p.name)
    assert second != run and not (second / "gradprune" / "state").exists()
    assert (second / "checkpoint-150" / "adapter_model.safetensors").is_file()
    assert f"pruned model     : {(second / 'gradprune' / 'model').relative_to(tmp_path)}" in again.stdout

    # The example YAML (README: after the demo made gradprune_demo/) runs as typed, reusing the pruned model.
    yaml_file = Path(__file__).parent.parent / "examples" / "yaml" / "tiny_cpu.yaml"
    swift = Path(sys.executable).with_name("swift")
    proc = subprocess.run([str(swift), "sft", str(yaml_file), "--max_steps", "4", "--save_steps", "4"], cwd=tmp_path,
                          env=offline_env(), capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    third = max((root / "output").glob("v*"), key=lambda p: p.name)
    assert third not in (run, second) and (third / "checkpoint-4" / "adapter_model.safetensors").is_file()


def _demo(cwd: Path) -> subprocess.CompletedProcess:
    gradprune = Path(sys.executable).with_name("gradprune")
    proc = subprocess.run([str(gradprune), "demo"], cwd=cwd, env=offline_env(),
                          capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc
