"""Finding a finished phase 1 again: a repeated run (e.g. after a crash) or a resumed phase 2 reuses
the pruned model of an earlier run when its report's hash of every phase-1-shaping setting matches."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..config import GradPruneConfig, GradPruneConfigError
from ..report import read_report
from .preflight import world_size

GRADPRUNE_DIR = "gradprune"
MODEL_DIR = "model"
HASHED_ARGS = (
    "model", "model_revision", "model_type", "template", "dataset", "split_dataset_ratio", "dataset_shuffle",
    "data_seed", "seed", "max_length", "truncation_strategy", "packing", "per_device_train_batch_size",
    "learning_rate", "lr_scheduler_type", "warmup_ratio", "warmup_steps",
    "weight_decay", "num_train_epochs", "max_steps", "max_grad_norm", "tuner_type", "lora_rank", "lora_alpha",
    "lora_dropout", "target_modules", "target_regex", "torch_dtype", "deepspeed",
)  # fmt: skip
"""SftArguments that shape phase 1 (with the resolved gradient accumulation and the world size):
a saved pruned model is reused only if none of them changed."""


def swift_version() -> str:
    from importlib.metadata import version

    return version("ms-swift")


def phase1_settings(args) -> dict[str, str]:
    """The swift settings that shape phase 1 (HASHED_ARGS, as the trainer resolved them)."""
    settings = {name: str(getattr(args, name, None)) for name in HASHED_ARGS}
    settings["gradient_accumulation_steps"] = str(args.training_args.gradient_accumulation_steps)
    settings["world_size"] = str(world_size())
    return settings


def config_hash(args, config: GradPruneConfig) -> str:
    options = config.to_dict()
    del options["benchmark"]  # measures the result, does not shape it
    blob = json.dumps({"gradprune": options, "swift": phase1_settings(args)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def find_finished_phase1(args, key: str) -> Path | None:
    """A pruned model saved by an earlier run of the same command (same output_dir, same hash)."""
    here = Path(args.output_dir)
    candidates = [here / GRADPRUNE_DIR / MODEL_DIR]
    if args.add_version:  # earlier runs live in sibling version folders v0-..., v1-...
        siblings = here.parent.glob(f"v*/{GRADPRUNE_DIR}/{MODEL_DIR}")
        candidates += sorted(siblings, key=lambda p: p.stat().st_mtime, reverse=True)
    for candidate in candidates:
        report = read_report(candidate)
        if report and report.get("config_hash") == key and (candidate / "config.json").is_file():
            return candidate
    if read_report(candidates[0]) is not None:
        from swift.utils import get_logger

        get_logger().warning(f"[GradPruner] {candidates[0]} was made with other settings; it will be replaced")
    return None


def pruned_model_of_checkpoint(checkpoint: str, key: str) -> Path:
    """The pruned model a phase-2 checkpoint was trained on; it must come from these same settings."""
    args_file = Path(checkpoint) / "args.json"
    model = json.loads(args_file.read_text())["model"] if args_file.is_file() else None
    report = read_report(model) if model else None
    if report is None or report.get("config_hash") != key:
        raise GradPruneConfigError(
            f"--resume_from_checkpoint {checkpoint} cannot be resumed with these settings: it was trained on "
            f"{model}, which is not a GradPruner model made with the same swift and --gradprune arguments; "
            "repeat the original command's arguments, or start again without --resume_from_checkpoint"
        )
    return Path(model)
