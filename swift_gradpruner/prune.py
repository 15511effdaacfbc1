"""One GradPruner step on an in-memory model: score -> select -> merge -> remove, plus its report."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .architecture import auto_class, layers_prefix, parameter_counts
from .bench.inference import REPORT_WORKLOADS, TransformersEngine, Workload, compare_inference
from .config import IGIA_SCORES, GradPruneConfig
from .coverage import check_igia_comparable
from .criteria import Batch, mean_loss, removed_layers
from .guard import GuardError, GuardReport, largest_within, loss_with_plan
from .importance import IGIAAccumulator, layer_scores
from .layer_config import check_removal
from .merge import merge_priority, merge_removed_layers
from .report import PLOT_NAME, REPORT_NAME, plot_layer_scores, write_json
from .selection import LayerPlan, layers_to_remove, plan_layers, plan_removal
from .serving import vllm_cpu_refusal, vllm_refusal
from .surgery import Snapshot, atomic_dir, remove_layers, save_checkpoint


@dataclass
class PruneResult:
    plan: LayerPlan
    report: dict[str, Any]
    guard: GuardReport | None = None


def prune_model(
    model: nn.Module,
    accumulator: IGIAAccumulator | None,
    config: GradPruneConfig,
    *,
    calibration: Sequence[Batch] | None = None,
    guard: Sequence[Batch] | None = None,
    criterion_cache: dict | None = None,
    device: torch.device | str | None = None,
    extra: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
    surgery: Callable[[LayerPlan, Callable[[str], torch.Tensor | None]], dict[int, dict[str, float]]] | None = None,
) -> PruneResult:
    """Prune ``model`` in place from the captured gradients and describe what was done.

    ``accumulator`` may be None only for a criterion that needs no gradients and no merge.
    ``calibration`` holds batches of training rows for the criteria that run the model
    (``config.needs_calibration``). ``guard`` holds batches of held-out rows for the quality guard
    (guard.py; needed by ``prune_layers='auto'``); its measurements go to ``report['quality_guard']``
    and ``PruneResult.guard``. ``criterion_cache`` keeps their measurements for another call on
    the same unpruned model and batches (see ``criteria.removed_layers``). ``device`` is where IGIA
    matrices are rebuilt and merged (default: CPU); with ``config.benchmark`` the dense and the pruned
    model are timed where the model is (``time_dense_vs_pruned``). ``extra`` is copied into the report
    (e.g. the phase-1 settings of a swift run). ``log`` receives a line as each stage starts and ends.
    ``surgery(plan, igia)``, when given, merges and writes the weights elsewhere (streaming.py) and
    returns the merged fractions; ``model`` (then a meta-device model) only loses its layers.
    """
    stage = _stages(log)
    per_layer, total_before = parameter_counts(model)
    if accumulator is None:
        if config.score in IGIA_SCORES or config.merge_layers != 0:
            raise ValueError(f"score={config.score!r} with merge_layers={config.merge_layers} needs the IGIA gradients")
        accumulator = IGIAAccumulator()
        linear, scores, outside = {}, [0.0] * len(per_layer), []
    else:
        linear = accumulator.linear_scores(config.score if config.score in IGIA_SCORES else "squared")
        scores, outside = layer_scores(linear, len(per_layer), layers_prefix(model))
        if config.score in IGIA_SCORES:
            check_igia_comparable(model, accumulator.linear_names, config.score)
    captured = set(accumulator.linear_names)

    def igia(name: str) -> torch.Tensor | None:
        return accumulator.igia(name, device) if name in captured else None

    cache = {} if criterion_cache is None else criterion_cache
    plans: dict[int, tuple[LayerPlan, dict]] = {}

    def plan_for(count: int) -> LayerPlan:
        if count not in plans:
            merge = config.merge_count(count)
            if config.score in IGIA_SCORES:
                removed, measured = plan_layers(scores, count, 0).removed, {}
            else:
                removed, measured = removed_layers(model, config.score, count, calibration, cache)
            # The K merged layers: highest IGIA over the linears each would merge (merge.merge_priority).
            priority = merge_priority(model, linear, removed) if merge else scores
            plans[count] = (plan_removal(len(per_layer), removed, merge, priority), measured)
        return plans[count][0]

    with stage(f"choosing the layers to remove ({config.score}" + (", quality guard" if guard else "") + ")"):
        remove, guard_report = _layer_count(model, config, per_layer, total_before, plan_for, igia, guard)
        plan = plan_for(remove)
    criterion = plans[remove][1]
    check_removal(model.config, plan.kept)  # a removal the config cannot express fails before any weight changes
    snapshot = Snapshot(model, weights_of=sorted(set(plan.merged.values()))) if config.benchmark else None
    with stage(f"merging {len(plan.merged)} and removing {len(plan.removed)} of {len(per_layer)} layers"):
        fractions = merge_removed_layers(model, plan, igia, config) if surgery is None else surgery(plan, igia)
        remove_layers(model, plan.removed)
    _, total_after = parameter_counts(model)
    timing = {}
    if snapshot is not None:
        with stage(f"timing dense vs pruned on {next(model.parameters()).device.type} (alternating rounds)"):
            timing["inference_benchmark"] = time_dense_vs_pruned(model, snapshot)
        del snapshot  # the removed layers go with it
    report = {
        "gradprune_version": __version__,
        "model_type": model.config.model_type,
        "config": config.to_dict(),
        "steps": asdict(accumulator.counts),
        "num_layers_before": len(per_layer),
        "num_layers_after": len(plan.kept),
        "layer_scores": scores,
        "criterion": {"name": config.score, **criterion},
        "linear_scores": linear,
        "linears_outside_layers": outside,
        "dropped_layers": list(plan.dropped),
        "merged_layers": {str(k): v for k, v in plan.merged.items()},
        "merge_shortfall": config.merge_count(remove) - len(plan.merged),
        "kept_layers": list(plan.kept),
        "merged_fraction": {str(k): v for k, v in fractions.items()},
        "params_before": total_before,
        "params_after": total_after,
        "params_removed_fraction": 1 - total_after / total_before,
        "decoder_params_removed_fraction": sum(per_layer[j] for j in plan.removed) / sum(per_layer),
        "factor_store_bytes": accumulator.factor_bytes,
        **timing,
        **({"quality_guard": guard_report.to_dict()} if guard_report else {}),
        **({"vllm_unsupported": refusal} if (refusal := vllm_refusal(model.config)) else {}),
        **({"vllm_cpu_unsupported": cpu} if (cpu := vllm_cpu_refusal(model.config)) else {}),
        **(extra or {}),
    }
    return PruneResult(plan=plan, report=report, guard=guard_report)


def time_dense_vs_pruned(model: nn.Module, dense: Snapshot, rounds: int = 5) -> dict[str, Any]:
    """The report's inference benchmark: ``gradprune bench``'s transformers measurement (bench/) of
    the pruned ``model`` and of its ``dense`` snapshot, in alternating rounds on the model's device.

    Skipped, with the reason, on a CPU-resident model when a GPU exists (the dense model did not fit).
    """
    device = next(model.parameters()).device
    entry: dict[str, Any] = {"device": device.type, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                             "backend": "transformers"}  # fmt: skip
    if device.type == "cpu" and torch.cuda.is_available():
        entry["skipped"] = "the dense model did not fit on one GPU; time it with gradprune bench on a larger device"
        return entry
    engine = TransformersEngine(model)

    def run_dense(workload: Workload) -> float:
        with dense.restored():
            return engine.run(workload)

    limit = getattr(model.config, "max_position_embeddings", None)
    workloads = [w.fitted(limit) for w in REPORT_WORKLOADS]
    entry["workloads"] = compare_inference(run_dense, engine.run, workloads, rounds=rounds)
    return entry


def _stages(log: Callable[[str], None] | None):
    """A context manager factory: logs '<what> ...' and '<what>: done in N s' around a stage."""

    @contextmanager
    def stage(what: str):
        start = time.perf_counter()
        if log:
            log(f"[GradPruner] {what} ...")
        yield
        if log:
            log(f"[GradPruner] {what}: done in {time.perf_counter() - start:.1f} s")

    return stage


def _layer_count(model, config, per_layer, total, plan_for, igia, guard) -> tuple[int, GuardReport | None]:
    """N (fixed, or 'auto': the largest within the guard's threshold) and the guard's measurements."""
    if config.prune_layers == "auto":
        if not guard:
            raise ValueError("prune_layers='auto' needs held-out guard batches to measure the loss on")
        ceiling = layers_to_remove(replace(config, prune_layers=None, merge_layers=0), per_layer, total)
    else:
        ceiling = layers_to_remove(config, per_layer, total)
    if not guard:
        return ceiling, None
    dense_loss = mean_loss(model, guard)
    losses: dict[int, float] = {}

    def loss_of(count: int) -> float:
        if count not in losses:
            losses[count] = loss_with_plan(model, plan_for(count), igia, config, guard)
        return losses[count]

    limit = dense_loss * (1 + config.max_loss_increase)
    rows = sum(int(b["input_ids"].shape[0]) for b in guard)
    report = GuardReport(rows=rows, dense_loss=dense_loss, pruned_loss=0.0, threshold=config.max_loss_increase)
    if config.prune_layers == "auto":
        count = largest_within(1, ceiling, loss_of, limit)
        if count is None:
            raise GuardError(
                f"prune_layers=auto: removing even one layer raises the loss on {rows} held-out rows by more than "
                f"max_loss_increase={config.max_loss_increase} (dense {dense_loss:.3f}, 1 layer {losses[1]:.3f}); "
                "raise --gradprune_max_loss_increase or set --gradprune_prune_layers"
            )
    else:
        count = ceiling
    report.pruned_loss = loss_of(count)
    if not report.ok:
        report.suggestion = largest_within(1, count - 1, loss_of, limit)
    report.losses = losses
    return count, report


def save_pruned(
    model: nn.Module,
    result: PruneResult,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    overwrite: bool = False,
    extra_files: dict[str, Any] | None = None,
) -> Path:
    """Save the pruned model as a plain HF checkpoint with the report and score plot inside it.

    ``extra_files`` maps more file names to JSON-able contents (e.g. swift's args.json).
    """
    files = _report_files(result, extra_files)
    return save_checkpoint(model, out_dir, tokenizer=tokenizer, overwrite=overwrite, extra_files=files)


def _report_files(result: PruneResult, extra_files: dict[str, Any] | None) -> dict[str, Callable[[Path], None]]:
    """Writers of the report, the score plot and ``extra_files`` (JSON contents), by file name."""
    files = {
        REPORT_NAME: lambda path: write_json(path, result.report),
        PLOT_NAME: lambda path: plot_layer_scores(path, result.report),
    }
    for name, content in (extra_files or {}).items():
        if isinstance(content, _Raw):
            files[name] = lambda path, content=content: path.exists() or path.write_bytes(content)
        else:
            files[name] = lambda path, content=content: write_json(path, content)
    return files


def prune_checkpoint(model_dir: str | os.PathLike, accumulator: IGIAAccumulator, config: GradPruneConfig,
                     out_dir: str | os.PathLike, extra: dict[str, Any], swift_args: dict[str, Any], *,
                     guard=None, calibration=None, log=print, warn=print) -> PruneResult:  # fmt: skip
    """Load the base checkpoint in its own dtype, prune and merge it, save it with its report.

    The model runs on the GPU when there is one and it fits (forward passes of the guard and the
    criteria, the merge, the timing), else on the CPU. ``swift_args`` becomes the checkpoint's
    args.json, from which ``swift infer --model`` and ``swift export`` take model_type and template
    (``swift sft`` ignores it: load_args is off there). ``guard`` and ``calibration`` are encoded
    batches of held-out and of training rows (swift/holdout.py). ``log`` and ``warn`` receive progress
    lines and the quality guard's warning.
    """
    from transformers import AutoConfig, AutoTokenizer

    model_class = auto_class(AutoConfig.from_pretrained(model_dir))
    if config.score in IGIA_SCORES and not guard and not config.benchmark and _has_safetensors(model_dir):
        result = _prune_streaming(model_dir, accumulator, config, out_dir, extra, swift_args, log)
    else:
        with _zero3_init_off():
            model = model_class.from_pretrained(model_dir, dtype="auto", device_map="cpu")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = _onto(model, device)
        result = prune_model(model, accumulator, config, calibration=calibration, guard=guard, device=device,
                             extra=extra, log=log)  # fmt: skip
        if result.guard is not None and not result.guard.ok:
            warn(f"[GradPruner] WARNING: {result.guard.message(len(result.plan.removed))}")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        log(f"[GradPruner] saving the pruned model to {out_dir} ...")
        save_pruned(model, result, out_dir, tokenizer=tokenizer, overwrite=True,
                    extra_files={"args.json": swift_args, **_other_files(model_dir)})  # fmt: skip
    if "vllm_unsupported" in result.report:
        warn(f"[GradPruner] WARNING: vLLM cannot serve the pruned model: {result.report['vllm_unsupported']}")
    return result


def _prune_streaming(model_dir, accumulator, config, out_dir, extra, swift_args, log) -> PruneResult:
    """prune_checkpoint without loading the model: nothing needs to run it (an IGIA ranking, no quality
    guard, no timing), so the shards are pruned one layer at a time (streaming.py)."""
    from transformers import AutoConfig

    from .streaming import write_pruned

    model_config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        meta = auto_class(model_config)(model_config)
    prefix = layers_prefix(meta)
    log(f"[GradPruner] streaming surgery: {model_dir} is pruned shard by shard, one layer in memory at a time")
    with atomic_dir(out_dir, overwrite=True) as folder:

        def surgery(plan: LayerPlan, igia) -> dict[int, dict[str, float]]:
            return write_pruned(model_dir, folder, plan, igia, config, prefix=prefix)

        result = prune_model(meta, accumulator, config, extra=extra, log=log, surgery=surgery)
        for name, write in _report_files(result, {"args.json": swift_args}).items():
            write(folder / name)
    return result


def _has_safetensors(model_dir) -> bool:
    """A safetensors checkpoint whose decoder-layer keys are what the model calls them (streaming.py)."""
    from transformers import AutoConfig

    from .architecture import text_config
    from .streaming import INDEX_NAME, has_layer_keys

    if not ((Path(model_dir) / "model.safetensors").is_file() or (Path(model_dir) / INDEX_NAME).is_file()):
        return False
    model_config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        meta = auto_class(model_config)(model_config)
    return has_layer_keys(model_dir, layers_prefix(meta), text_config(model_config).num_hidden_layers)


def _other_files(model_dir) -> dict[str, Any]:
    """Files of the base checkpoint that save_pretrained and the tokenizer do not write (a vision-language
    model's processor and chat template), as extra files for the pruned checkpoint."""
    from .streaming import WEIGHT_SUFFIXES

    written = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "args.json"}  # fmt: skip
    out = {}
    for path in Path(model_dir).iterdir():
        if path.is_file() and path.name not in written and not path.name.endswith(WEIGHT_SUFFIXES):
            out[path.name] = _Raw(path.read_bytes())
    return out


class _Raw(bytes):
    """File contents copied as they are (``_report_files`` writes JSON for anything else)."""


def _onto(model, device: str):
    """``model`` on ``device`` if it fits there, else where it is."""
    if device == "cpu":
        return model
    try:
        return model.to(device)
    except torch.OutOfMemoryError:
        model.to("cpu")
        torch.cuda.empty_cache()
        return model


@contextmanager
def _zero3_init_off():
    """Load a whole model on one rank even inside a ZeRO-3 run (transformers would partition it)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved
