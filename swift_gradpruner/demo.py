"""The offline demo: a real ``swift sft --gradprune true`` run on a tiny embedded model and dataset.

``gradprune demo`` writes a tiny random Llama (8 layers), a locally trained tokenizer, a chat
dataset and the YAML config below into a folder, then runs ``swift sft <that yaml>`` exactly as a
user would, and ``swift infer`` on the phase-2 checkpoint. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TINY_CPU_YAML = """\
# GradPruner on a tiny Llama (random, then briefly trained on the task), on CPU, offline.
# `gradprune demo` creates gradprune_demo/ and runs `swift sft gradprune_demo/tiny_cpu.yaml`
# (this file, with paths relative to the working directory).
model: gradprune_demo/model
model_type: llama
template: chatml
dataset: gradprune_demo/train.jsonl
check_model: false
tuner_type: lora
lora_rank: 8
lora_alpha: 32
learning_rate: 0.001
max_steps: 150
per_device_train_batch_size: 8
gradient_accumulation_steps: 1
torch_dtype: float32
fp16: false
dataloader_num_workers: 0
logging_steps: 10
save_steps: 150
report_to: none
output_dir: gradprune_demo/output
# GradPruner with its defaults: 40% of the decoder-layer parameters removed (3 of the 8 layers),
# those that change their input least on rows of this data (Block Influence), none merged;
# no phase 1 (neither the criterion nor a merge reads LoRA gradients); a quality guard measures how far
# the pruned model moved from the dense one (KL) on 32 held-out rows.
gradprune: true
"""

QUESTIONS = ["What is 12 plus 7?", "Spell the word tiger backwards.", "Which is larger, 3 or 15?"]


def swift_command() -> list[str]:
    """The ``swift`` CLI of this interpreter's environment."""
    script = Path(sys.executable).with_name("swift")
    return [str(script)] if script.exists() else [sys.executable, "-m", "swift.cli.main"]


def offline_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "USE_HF": "1", "TRANSFORMERS_OFFLINE": "1"}


def prepare(root: Path) -> Path:
    """Create the tiny model, tokenizer, dataset and YAML under ``root`` (once); return the YAML path."""
    from .tiny import create_tiny

    if not (root / "model" / "config.json").is_file():
        print(f"[demo] creating a tiny Llama (8 layers), tokenizer and dataset in {root}/ ...", flush=True)
        create_tiny(root, arch="llama", num_layers=8, rows=1200, pretrain_steps=400)
    yaml_path = root / "tiny_cpu.yaml"
    yaml_path.write_text(TINY_CPU_YAML.replace("gradprune_demo/", f"{root.as_posix()}/"), encoding="utf-8")
    return yaml_path


def run_demo(root: str | Path = "gradprune_demo") -> int:
    root = Path(root)
    yaml_path = prepare(root)
    print(f"[demo] tiny model, dataset and config in {root}/; running: swift sft {yaml_path}", flush=True)
    code = subprocess.call([*swift_command(), "sft", str(yaml_path)], env=offline_env())
    if code != 0:
        return code
    run_dir = max((root / "output").glob("v*"), key=lambda p: p.stat().st_mtime)
    checkpoint = max(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    # The base the phase-2 checkpoint was trained on: this run's gradprune/model (when the demo is run
    # again, a hard-linked copy of the earlier run's identical pruned model, which swift sft reused).
    pruned = _relative(Path(json.loads((checkpoint / "args.json").read_text())["model"]))
    questions = root / "questions.jsonl"
    questions.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q in QUESTIONS))
    answers = run_dir / "demo_answers.jsonl"
    print(f"[demo] swift infer --adapters {checkpoint}", flush=True)
    with (run_dir / "demo_infer.log").open("w") as log:
        code = subprocess.call(
            [*swift_command(), "infer", "--adapters", str(checkpoint), "--val_dataset", str(questions),
             "--max_new_tokens", "24", "--temperature", "0", "--result_path", str(answers)],
            env=offline_env(), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    if code != 0:
        print(f"[demo] swift infer failed, see {run_dir / 'demo_infer.log'}")
        return code
    report = json.loads((pruned / "gradprune_report.json").read_text())
    print("\n[demo] done.")
    print(f"  pruned model     : {pruned}  ({report['num_layers_before']} -> {report['num_layers_after']} layers, "
          f"{report['params_before']:,} -> {report['params_after']:,} parameters)")  # fmt: skip
    print(f"  dropped / merged : {report['dropped_layers']} / {report['merged_layers']} (removed layer -> target)")
    print(f"  report, plot     : {pruned / 'gradprune_report.json'}, {pruned / 'gradprune_layer_scores.png'}")
    if "inference_benchmark" in report:
        from .bench.inference import describe

        print(f"  {describe(report['inference_benchmark'])}")
    print(f"  phase-2 adapter  : {checkpoint}")
    for line in answers.read_text().splitlines():
        row = json.loads(line)
        print(f"  Q: {row['messages'][0]['content']!r}  A: {row['response']!r}")
    return 0


def _relative(path: Path) -> Path:
    """``path`` relative to the working directory when it lies below it (shorter to print)."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path
