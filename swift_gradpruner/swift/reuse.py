"""Finding earlier work again. Two keys:

* the *phase-1 key* hashes everything that shapes phase 1 (swift's settings, the dataset files'
  contents, package versions, and the GradPruner options that change the probe or the rows it holds
  out). A run whose key matches a saved IGIA state (``<output_dir>/gradprune/state``) skips phase 1
  and prunes from that state: trying another N, K, p, merge mode or criterion takes seconds.
* the *prune key* adds every pruning option. A pruned model whose report has it is reused as is
  (a repeated run after a crash), and a resumed phase 2 must have been trained on such a model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..config import GradPruneConfig, GradPruneConfigError
from ..report import read_report
from .preflight import world_size

GRADPRUNE_DIR = "gradprune"
MODEL_DIR = "model"
STATE_DIR = "state"
PHASE1_FILE = "phase1.json"
HASHED_ARGS = (
    "model", "model_revision", "model_type", "template", "system", "dataset", "val_dataset", "split_dataset_ratio",
    "dataset_shuffle", "data_seed", "seed", "max_length", "truncation_strategy", "packing", "padding_free",
    "streaming", "loss_scale", "per_device_train_batch_size", "learning_rate", "lr_scheduler_type",
    "lr_scheduler_kwargs", "warmup_ratio", "warmup_steps", "optim", "optimizer", "adam_beta1", "adam_beta2",
    "adam_epsilon", "weight_decay", "num_train_epochs", "max_steps", "max_grad_norm", "tuner_type", "lora_rank",
    "lora_alpha", "lora_dropout", "lora_dtype", "use_rslora", "init_weights", "target_modules", "target_regex",
    "torch_dtype", "model_kwargs", "attn_impl", "quant_method", "quant_bits", "bnb_4bit_quant_type",
    "bnb_4bit_compute_dtype", "bnb_4bit_use_double_quant", "deepspeed",
)  # fmt: skip
"""SftArguments that shape phase 1 (with the resolved gradient accumulation and the world size)."""
PHASE1_OPTIONS = ("steps", "step_ratio", "lora_rank", "lora_alpha", "guard_rows", "calibration_rows")
"""GradPruner options that shape phase 1 or the rows it keeps aside; the others only shape pruning."""
VERSIONED = ("torch", "transformers", "peft", "ms-swift", "deepspeed", "swift-gradpruner")


def swift_version() -> str:
    from importlib.metadata import version

    return version("ms-swift")


def phase1_settings(args) -> dict[str, str]:
    """The swift settings that shape phase 1 (HASHED_ARGS, as the trainer resolved them)."""
    settings = {name: str(getattr(args, name, None)) for name in HASHED_ARGS}
    settings["gradient_accumulation_steps"] = str(args.training_args.gradient_accumulation_steps)
    settings["world_size"] = str(world_size())
    return settings


def phase1_key(args, config: GradPruneConfig) -> str:
    options = {name: getattr(config, name) for name in PHASE1_OPTIONS}
    blob = {"gradprune": options, "swift": phase1_settings(args), "data": dataset_digests(args),
            "versions": _versions()}  # fmt: skip
    return _digest(blob)


def prune_key(first: str, config: GradPruneConfig) -> str:
    options = config.to_dict()
    del options["benchmark"]  # measures the result, does not shape it
    return _digest({"phase1": first, "gradprune": options})


def dataset_digests(args) -> dict[str, str]:
    """A content hash of every --dataset / --val_dataset entry that is a local file (hub names hash as text)."""
    out = {}
    for entry in [*(args.dataset or []), *(args.val_dataset or [])]:
        path = Path(str(entry).split(":")[0].split("#")[0])
        if path.is_file():
            digest = hashlib.sha256()
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            out[str(entry)] = digest.hexdigest()[:16]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            out[str(entry)] = _digest(
                [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
            )
    return out


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def find_state(args, key: str) -> Path | None:
    """A complete phase-1 state with this phase-1 key, here or in a sibling version folder."""
    for candidate in _here_then_siblings(args, STATE_DIR):
        info = candidate / PHASE1_FILE
        if info.is_file() and json.loads(info.read_text()).get("phase1_key") == key:
            return candidate
    return None


def _here_then_siblings(args, leaf: str) -> list[Path]:
    here = Path(args.output_dir)
    candidates = [here / GRADPRUNE_DIR / leaf]
    if args.add_version:  # earlier runs live in sibling version folders v0-..., v1-...
        siblings = here.parent.glob(f"v*/{GRADPRUNE_DIR}/{leaf}")
        candidates += sorted(siblings, key=lambda p: p.stat().st_mtime, reverse=True)
    return candidates


def find_pruned_model(args, key: str) -> Path | None:
    """A pruned model saved by an earlier run of the same command (same output_dir, same prune key)."""
    candidates = _here_then_siblings(args, MODEL_DIR)
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
