"""What identifies earlier work: one key per decision, each made of what that decision depends on.

=================  =========================================================== =========================================
key                what it holds                                               why
=================  =========================================================== =========================================
model identity     a Hugging Face hub snapshot: its commit sha; any other      taken after the weights are on disk (rank
                   folder (local, ModelScope cache): a content hash of         0 downloads a hub model first); no
                   config.json and the weight index, and per weight file that  modification times, so every node's copy
                   ``from_pretrained`` loads its size and a hash of 16 evenly  of the same files agrees and a same-size
                   spaced 64 KiB blocks (``model_identity``)                   file with other weights does not
rows key           a hash of the encoded guard and calibration batches rank 0  they are exactly what the prune step
                   saves in the state (token ids, masks, labels: ``rows_key``) reads: dataset, template, row shaping,
                                                                               max_length and seed are in them, with
                                                                               no list of swift arguments
phase-1 key        only when phase 1 runs: every swift setting but             phase 1 is the first t steps of the
                   ``NOT_HASHED``, the datasets' contents (by content, not the user's own run, so nearly every training
                   path typed), the model identity, the phase-1 GradPruner     setting (learning rate, schedule, batch,
                   options, package release lines (``phase1_key``)             max_steps, ...) shapes its gradients
prune key          model identity + rows key (+ phase-1 key when phase 1 ran)  a pruned model whose report holds it is
                   + the GradPruner options that change the pruned model (the  reused as is: a new learning rate, epoch
                   phase-1 options only with phase 1) + --model_type + this    count or DeepSpeed config of the default
                   package's version (``prune_key``)                           criterion prunes nothing again
resume             the checkpoint's pruned model is intact (its weight files   nothing of phase 2 counts (extend
                   as saved) and was made from this model identity with these  --max_steps, change the learning rate);
                   pruning options (``reuse.pruned_model_of_checkpoint``)      other package versions are a log line
rank agreement     every rank's GradPruner options, swift settings, package    ranks that differ would take different
                   versions and, for a local folder, model identity, against   paths and wait on each other; a hub
                   rank 0's (``agreement``, ``differences``)                   model is compared by its ID and revision
                                                                               (nodes download it at their own pace)
=================  =========================================================== =========================================
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from ..config import GradPruneConfig
from ..weight_files import loaded_weight_files

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
    # where the files are: their contents count instead (the data's digests, the model's identity)
    "dataset", "val_dataset",
    # secrets: never hashed into, nor written to, phase1.json and the report
    "swanlab_token", "swanlab_secret", "swanlab_project", "swanlab_workspace", "swanlab_exp_name",
    "swanlab_notification_method", "swanlab_webhook_url", "swanlab_sender_email", "swanlab_receiver_email",
    "swanlab_smtp_server", "swanlab_smtp_port", "swanlab_email_language", "swanlab_mode",
})  # fmt: skip
"""SftArguments that cannot change phase 1 or the rows it holds out. Every other argument is hashed into the
phase-1 key, so an argument a new ms-swift adds makes a fresh phase 1 (short by design) by default."""
PHASE1_OPTIONS = ("steps", "step_ratio", "lora_rank", "lora_alpha", "guard_rows", "calibration_rows")
"""GradPruner options that shape phase 1 or the rows it keeps aside; the others only shape pruning."""
PHASE1_ONLY = ("steps", "step_ratio", "lora_rank", "lora_alpha")
"""Options that do nothing without phase 1 (``GradPruneConfig.unused_options``)."""
NOT_PRUNING = ("benchmark", "keep_state")
"""Options that measure or keep things but do not change the pruned model."""
OWN = "swift-gradpruner"
VERSIONED = ("torch", "transformers", "peft", "ms-swift", "deepspeed", OWN)
SECTIONS = ("gradprune", "swift", "model", "versions")
"""What every rank compares with rank 0 (``data``: rank 0 alone reads the dataset files)."""
SAMPLES, SAMPLE_BYTES = 16, 1 << 16
"""A weight file's content sample: this many evenly spaced blocks of this size (first and last included)."""
DATASET_INFOS = "dataset_infos.json"
"""swift renames it to ``dataset_infos.json_bak`` when it first loads a downloaded dataset folder."""
_HUB_SNAPSHOT = re.compile(r"/snapshots/([0-9a-f]{40})$")


def model_identity(model_dir: str | Path) -> dict[str, Any]:
    """What identifies the model's weights without reading them whole: a Hugging Face hub snapshot's commit
    sha, or, for any other folder, the content hash of config.json and the weight index and, per weight
    file ``from_pretrained`` loads, its size and a hash of evenly spaced blocks (``sampled_hash``)."""
    folder = Path(model_dir)
    hub = _HUB_SNAPSHOT.search(folder.absolute().as_posix().rstrip("/"))
    if hub:
        return {"hub_revision": hub.group(1)}
    out: dict[str, Any] = {}
    for name in ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / name).is_file():
            out[name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()[:16]
    for path in loaded_weight_files(folder) if folder.is_dir() else []:
        out[path.name] = [path.stat().st_size, sampled_hash(path)]
    return out


def sampled_hash(path: Path) -> str:
    """A hash of SAMPLES blocks of SAMPLE_BYTES at evenly spaced offsets of a file (its whole content when
    smaller): another training's weights in a file of the same size differ in every block."""
    size = path.stat().st_size
    sha = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        if size <= SAMPLES * SAMPLE_BYTES:
            sha.update(f.read())
        else:
            for i in range(SAMPLES):
                f.seek((size - SAMPLE_BYTES) * i // (SAMPLES - 1))
                sha.update(f.read(SAMPLE_BYTES))
    return sha.hexdigest()[:16]


def rows_key(batches: dict[str, list[dict[str, Any]]]) -> str:
    """The hash of the encoded guard and calibration batches (``holdout.save_batches``'s groups)."""
    sha = hashlib.sha256()
    for group in sorted(batches):
        for i, batch in enumerate(batches[group]):
            for name in sorted(batch):
                tensor = batch[name].contiguous()
                sha.update(f"{group}/{i}/{name}/{tensor.dtype}/{tuple(tensor.shape)}".encode())
                sha.update(tensor.numpy().tobytes())
    return sha.hexdigest()[:16]


def swift_settings(args) -> dict[str, str]:
    """The swift settings that may shape phase 1: every argument but NOT_HASHED, as the trainer resolved
    them, with the gradient accumulation and the world size."""
    from .preflight import world_size

    names = [f.name for f in fields(args)] if is_dataclass(args) else [n for n in vars(args) if n != "training_args"]
    settings = {name: str(getattr(args, name, None)) for name in sorted(names) if name not in NOT_HASHED}
    settings["gradient_accumulation_steps"] = str(args.training_args.gradient_accumulation_steps)
    settings["world_size"] = str(world_size())
    return settings


def from_hub(args) -> bool:
    """Whether --model is a hub ID (swift downloads it) rather than a local folder."""
    model = str(args.model)
    return not (Path(model).expanduser().exists() or Path("/".join(model.split(":", 1))).exists())


def agreement(args, config: GradPruneConfig) -> dict[str, Any]:
    """What every rank must share with rank 0: all GradPruner options, the swift settings, the package
    versions and the model (a local folder by its identity; a hub model by ID and revision, which the swift
    settings hold, since each node downloads it at its own pace)."""
    return {
        "gradprune": config.to_dict(),
        "swift": {**swift_settings(args), "model": str(args.model), "model_revision": str(args.model_revision)},
        "model": {} if from_hub(args) else model_identity(args.model_dir),
        "versions": versions(),
    }


def phase1_key(args, config: GradPruneConfig, identity: dict[str, Any], data: dict[str, Any]) -> str:
    """The key of a phase-1 state: swift settings, phase-1 options, model identity, the data's digests and
    package versions by release line (a patch release changes no key; this package's version counts whole)."""
    return digest(phase1_material(args, config, identity, data))


def phase1_material(args, config: GradPruneConfig, identity: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    release = {name: value if name == OWN or value is None else ".".join(value.split(".")[:2])
               for name, value in versions().items()}  # fmt: skip
    return {"gradprune": {name: getattr(config, name) for name in PHASE1_OPTIONS}, "swift": swift_settings(args),
            "model": identity, "data": data, "versions": release}  # fmt: skip


def pruning_options(config: GradPruneConfig) -> dict[str, Any]:
    """The GradPruner options that change the pruned model (the phase-1 ones only when phase 1 runs)."""
    skipped = NOT_PRUNING + (() if config.needs_gradients else PHASE1_ONLY)
    return {name: value for name, value in config.to_dict().items() if name not in skipped}


def prune_key(identity: dict[str, Any], rows: str, phase1: str | None, config: GradPruneConfig,
              model_type: str | None) -> str:  # fmt: skip
    return digest({"model": identity, "rows": rows, "phase1": phase1, "gradprune": pruning_options(config),
                   "model_type": model_type, OWN: versions()[OWN]})  # fmt: skip


def differences(mine: dict[str, Any], reference: dict[str, Any], sections: tuple[str, ...] = SECTIONS,
                ) -> list[tuple[str, Any, Any]]:  # fmt: skip
    """(setting, my value, the reference's value) for every setting that differs in ``sections``."""
    out = []
    for section in sections:
        a, b = mine.get(section) or {}, reference.get(section) or {}
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                out.append((f"{section} {name}", a.get(name), b.get(name)))
    return out


def dataset_digests(args) -> dict[str, list[str]]:
    """The --dataset and --val_dataset entries in order, by content (``_entry_digest``): the same file typed
    as a relative or an absolute path gives the same digest."""
    return {"dataset": [_entry_digest(e) for e in args.dataset or []],
            "val_dataset": [_entry_digest(e) for e in args.val_dataset or []]}  # fmt: skip


def _entry_digest(entry: Any) -> str:
    """A local file as the hash of its bytes, a folder by its files' names and sampled contents (swift's rename
    of dataset_infos.json left out), anything else (a hub dataset) as typed; a ``:subset`` or ``#rows`` suffix
    stays."""
    text = str(entry)
    base = re.split(r"[:#]", text, maxsplit=1)[0]
    path, suffix = Path(base).expanduser(), text[len(base) :]
    if path.is_file():
        return f"file {_file_hash(path)}{suffix}"
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(DATASET_INFOS))
        return "folder " + digest([(p.relative_to(path).as_posix(), sampled_hash(p)) for p in files]) + suffix
    return text


def _file_hash(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()[:16]


def versions() -> dict[str, str | None]:
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
