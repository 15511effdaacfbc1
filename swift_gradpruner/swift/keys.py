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
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from ..config import GradPruneConfig

NOT_HASHED = frozenset({
    # where, how often and to whom the run logs, saves, evaluates and pushes (phase 1 saves nothing)
    "output_dir", "logging_dir", "add_version", "create_checkpoint_symlink", "run_name", "project", "report_to",
    "logging_strategy", "logging_steps", "logging_first_step", "log_on_each_node", "logging_nan_inf_filter",
    "log_level", "log_level_replica", "disable_tqdm", "include_num_input_tokens_seen", "skip_memory_metrics",
    "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id", "save_strategy", "save_steps",
    "save_total_limit", "save_only_model", "save_on_each_node", "safe_serialization", "max_shard_size",
    "enable_jit_checkpoint", "use_flash_ckpt", "push_to_hub", "hub_token", "hub_private_repo", "hub_model_id",
    "hub_strategy", "hub_always_push", "hub_revision", "eval_strategy", "eval_steps", "eval_delay",
    "per_device_eval_batch_size", "prediction_loss_only", "eval_on_start", "eval_do_concat_batches",
    "eval_use_gather_object", "eval_accumulation_steps", "include_for_metrics", "batch_eval_metrics",
    "load_best_model_at_end", "metric_for_best_model", "greater_is_better", "eval_metric", "early_stop_interval",
    "eval_use_evalscope", "eval_dataset", "eval_dataset_args", "eval_limit", "eval_generation_config",
    "extra_eval_args", "predict_with_generate", "generation_max_length", "generation_num_beams",
    "generation_config", "max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "num_beams",
    "stream", "stop_words", "logprobs", "top_logprobs", "structured_outputs_regex", "acc_strategy", "do_train",
    "do_eval", "do_predict", "sortish_sampler", "ds3_gather_for_generation", "val_dataset_shuffle",
    "cached_val_dataset", "check_model",
    # resuming phase 2 (checked on its own, reuse.pruned_model_of_checkpoint)
    "resume_from_checkpoint", "resume_only_model", "ignore_data_skip", "restore_callback_states_from_checkpoint",
    # this rank's placement and the host's worker counts: the same rows and gradients either way
    "local_rank", "device_map", "max_memory", "ddp_timeout", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_multiprocessing_context",
    "dataset_num_proc", "packing_num_proc", "load_from_cache_file", "download_mode", "torch_empty_cache_steps",
    "ignore_args_error", "use_ray", "ray_exp_name", "device_groups",
    # secrets: never hashed into, nor written to, phase1.json and the report
    "swanlab_token", "swanlab_secret", "swanlab_project", "swanlab_workspace", "swanlab_exp_name",
    "swanlab_notification_method", "swanlab_webhook_url", "swanlab_sender_email", "swanlab_receiver_email",
    "swanlab_smtp_server", "swanlab_smtp_port", "swanlab_email_language", "swanlab_mode",
})  # fmt: skip
"""SftArguments that cannot change phase 1 or the rows it holds out. Every other argument is hashed, so
an argument a new ms-swift adds (or one that reshapes the rows: --response_prefix, --columns, ...) makes
a fresh run by default."""
PHASE1_OPTIONS = ("steps", "step_ratio", "lora_rank", "lora_alpha", "guard_rows", "calibration_rows")
"""GradPruner options that shape phase 1 or the rows it keeps aside; the others only shape pruning."""
NOT_PRUNING = ("benchmark", "keep_state")
"""Options that measure or keep things but do not change the pruned model."""
OWN = "swift-gradpruner"
VERSIONED = ("torch", "transformers", "peft", "ms-swift", "deepspeed", OWN)
CONTENT_HASHED = ("config.json",)
"""Model files hashed by content (small, and what says which weights to expect), besides ``*.index.json``."""
SECTIONS = ("gradprune", "swift", "model", "versions")
"""The sections of the key material every rank computes (``data``: rank 0 alone)."""
_HUB_SNAPSHOT = re.compile(r"/snapshots/([0-9a-f]{40})$")


def phase1_settings(args) -> dict[str, str]:
    """The swift settings that may shape phase 1 or its rows: every argument but NOT_HASHED, as the
    trainer resolved them, with the gradient accumulation and the world size."""
    from .preflight import world_size

    names = [f.name for f in fields(args)] if is_dataclass(args) else [n for n in vars(args) if n != "training_args"]
    settings = {name: str(getattr(args, name, None)) for name in sorted(names) if name not in NOT_HASHED}
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
    """The hash of ``material``, with third-party packages by release line (``5.19``): a patch release
    changes no key; this package's own version counts whole."""
    versions = {name: value if name == OWN or value is None else ".".join(value.split(".")[:2])
                for name, value in (material.get("versions") or {}).items()}  # fmt: skip
    return digest({**material, "versions": versions})


def prune_key(first: str, config: GradPruneConfig) -> str:
    options = {k: v for k, v in config.to_dict().items() if k not in NOT_PRUNING}
    return digest({"phase1": first, "gradprune": options})


def differences(mine: dict[str, Any], reference: dict[str, Any], sections: tuple[str, ...] = SECTIONS,
                ) -> list[tuple[str, Any, Any]]:  # fmt: skip
    """(setting, my value, the reference's value) for every setting that differs in ``sections``; model
    files by size, not modification time (nodes may hold their own copies). Rank 0 alone reads the data,
    so the ranks compare every section but ``data``."""
    out = []
    for section in sections:
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
