"""What identifies earlier work: the settings, data, model files and package versions that shape phase 1.

* the *phase-1 key* hashes everything that shapes phase 1 or the rows it holds out: swift's settings,
  the dataset files' contents, the base model's files (a local folder by its config, index and each
  file's size and modification time; a Hugging Face hub snapshot by its resolved revision), package
  versions, and the GradPruner options that change the probe or the rows. A saved state with that key
  is reused (``reuse.find_state``).
* the *prune key* adds every pruning option. A pruned model whose report has it is reused as is.

Rank 0 alone hashes the dataset files; every rank computes the rest, and ``agree`` checks that they
are the same everywhere (swift/decide.py).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from ..config import GradPruneConfig

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
NOT_PRUNING = ("benchmark", "keep_state")
"""Options that measure or keep things but do not change the pruned model."""
VERSIONED = ("torch", "transformers", "peft", "ms-swift", "deepspeed", "swift-gradpruner")
CONTENT_HASHED = ("config.json",)
"""Model files hashed by content (small, and what says which weights to expect), besides ``*.index.json``."""
_HUB_SNAPSHOT = re.compile(r"/snapshots/([0-9a-f]{40})$")


def phase1_settings(args) -> dict[str, str]:
    """The swift settings that shape phase 1 (HASHED_ARGS, as the trainer resolved them)."""
    from .preflight import world_size

    settings = {name: str(getattr(args, name, None)) for name in HASHED_ARGS}
    settings["gradient_accumulation_steps"] = str(args.training_args.gradient_accumulation_steps)
    settings["world_size"] = str(world_size())
    return settings


def model_fingerprint(model_dir: str | Path) -> dict[str, Any]:
    """What identifies the model's weights without reading them: a hub snapshot's resolved revision, or,
    for any other folder, the content hash of config.json and the index and each other file's size and
    modification time (a re-exported merge, a newer revision or another model copied there differ)."""
    folder = Path(model_dir)
    hub = _HUB_SNAPSHOT.search(folder.absolute().as_posix().rstrip("/"))
    if hub:
        return {"hub_revision": hub.group(1)}
    out: dict[str, Any] = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.name in CONTENT_HASHED or path.name.endswith(".index.json"):
            out[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        else:
            stat = path.stat()
            out[path.name] = [stat.st_size, stat.st_mtime_ns]
    return out


def portable(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """A fingerprint without modification times: what every node's copy of the same model shares."""
    return {name: value[0] if isinstance(value, list) else value for name, value in fingerprint.items()}


def key_material(args, config: GradPruneConfig, *, data: bool) -> dict[str, Any]:
    """Everything the phase-1 key hashes; the dataset files are read only when ``data`` (rank 0)."""
    return {
        "gradprune": {name: getattr(config, name) for name in PHASE1_OPTIONS},
        "swift": phase1_settings(args),
        "model": model_fingerprint(args.model_dir),
        "versions": _versions(),
        "data": dataset_digests(args) if data else None,
    }


def phase1_key(material: dict[str, Any]) -> str:
    return digest(material)


def prune_key(first: str, config: GradPruneConfig) -> str:
    options = {k: v for k, v in config.to_dict().items() if k not in NOT_PRUNING}
    return digest({"phase1": first, "gradprune": options})


def differences(mine: dict[str, Any], reference: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(setting, my value, the reference's value) for every setting that differs, dataset digests and
    model modification times left out (rank 0 alone reads the data; nodes may hold their own copies)."""
    out = []
    for section in ("gradprune", "swift", "model", "versions"):
        a, b = mine.get(section) or {}, reference.get(section) or {}
        if section == "model":
            a, b = portable(a), portable(b)
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                out.append((f"{section} {name}", a.get(name), b.get(name)))
    return out


def dataset_digests(args) -> dict[str, str]:
    """A content hash of every --dataset / --val_dataset entry that is a local file (hub names hash as text)."""
    out = {}
    for entry in [*(args.dataset or []), *(args.val_dataset or [])]:
        path = Path(str(entry).split(":")[0].split("#")[0])
        if path.is_file():
            sha = hashlib.sha256()
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    sha.update(block)
            out[str(entry)] = sha.hexdigest()[:16]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            out[str(entry)] = digest(
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


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def swift_version() -> str:
    from importlib.metadata import version

    return version("ms-swift")
