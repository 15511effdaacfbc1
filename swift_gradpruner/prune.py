"""One GradPruner step on an in-memory model: score -> select -> merge -> remove, plus its report.

``checkpoint.prune_checkpoint`` runs it on a checkpoint on disk (loading, streaming, saving).
"""

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
from .architecture import layers_prefix, parameter_counts
from .bench.inference import REPORT_WORKLOADS, TransformersEngine, Workload, compare_inference
from .config import IGIA_SCORES, GradPruneConfig
from .coverage import check_igia_comparable
from .criteria import removed_layers
from .flops import matmul_weights
from .guard import GuardError, GuardReport, kl_with_plan, largest_within, loss_with_plan
from .importance import IGIAAccumulator, layer_scores
from .layer_config import check_removal
from .measures import Batch, mean_loss, reference_of
from .merge import merge_priority, merge_removed_layers
from .report import PLOT_NAME, REPORT_NAME, plot_layer_scores, write_json
from .selection import LayerPlan, layers_to_remove, plan_layers, plan_removal
from .serving import vllm_cpu_refusal, vllm_refusal
from .surgery import Snapshot, remove_layers, save_checkpoint


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
    seconds: dict[str, float] = {}
    stage = _stages(log, seconds)
    per_layer, total_before = parameter_counts(model)
    compute_before = matmul_weights(model)
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

    with stage(f"choosing the layers to remove ({config.score}" + (", quality guard" if guard else "") + ")", "choice"):
        remove, guard_report = _layer_count(model, config, per_layer, plan_for, igia, guard)
        plan = plan_for(remove)
    criterion = plans[remove][1]
    check_removal(model.config, plan.kept)  # a removal the config cannot express fails before any weight changes
    snapshot = Snapshot(model, weights_of=sorted(set(plan.merged.values()))) if config.benchmark else None
    with stage(f"merging {len(plan.merged)} and removing {len(plan.removed)} of {len(per_layer)} layers", "surgery"):
        fractions = merge_removed_layers(model, plan, igia, config) if surgery is None else surgery(plan, igia)
        remove_layers(model, plan.removed)
    _, total_after = parameter_counts(model)
    kept_compute = matmul_weights(model) / compute_before
    timing = {}
    if snapshot is not None:
        with stage(f"timing dense vs pruned on {next(model.parameters()).device.type} (alternating rounds)", "timing"):
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
        "kept_compute_fraction": kept_compute,
        "factor_store_bytes": accumulator.factor_bytes,
        "stage_seconds": seconds,
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
    A model spread over several GPUs by a device_map is timed as it is (its layers run one GPU after another).
    """
    device = next(model.parameters()).device
    entry: dict[str, Any] = {"device": device.type, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                             "backend": "transformers"}  # fmt: skip
    if device.type == "cpu" and torch.cuda.is_available():
        entry["skipped"] = "the dense model did not fit on the GPUs; time it with gradprune bench on a larger device"
        return entry
    engine = TransformersEngine(model)

    def run_dense(workload: Workload) -> float:
        with dense.restored():
            return engine.run(workload)

    limit = getattr(model.config, "max_position_embeddings", None)
    workloads = [w.fitted(limit) for w in REPORT_WORKLOADS]
    entry["workloads"] = compare_inference(run_dense, engine.run, workloads, rounds=rounds)
    return entry


def _stages(log: Callable[[str], None] | None, seconds: dict[str, float] | None = None):
    """A context manager factory: logs '<what> ...' and '<what>: done in N s' around a stage, and adds
    the duration to ``seconds[key]`` when a key is given."""

    @contextmanager
    def stage(what: str, key: str | None = None):
        start = time.perf_counter()
        if log:
            log(f"[GradPruner] {what} ...")
        yield
        took = time.perf_counter() - start
        if seconds is not None and key is not None:
            seconds[key] = seconds.get(key, 0.0) + took
        if log:
            log(f"[GradPruner] {what}: done in {took:.1f} s")

    return stage


def _layer_count(model, config, per_layer, plan_for, igia, guard) -> tuple[int, GuardReport | None]:
    """N (fixed, or 'auto': the largest within the guard's threshold) and the guard's measurements."""
    if config.prune_layers == "auto":
        if not guard:
            raise GuardError(
                "prune_layers=auto measures the damage on held-out guard rows and there are none (the training set "
                "is smaller than 4 x --gradprune_guard_rows, streaming, or no row could be encoded); set "
                "--gradprune_prune_layers to a number"
            )
        ceiling = layers_to_remove(replace(config, prune_layers=None, merge_layers=0), len(per_layer))
    else:
        ceiling = layers_to_remove(config, len(per_layer))
    if not guard:
        return ceiling, None
    dense = reference_of(model, guard)
    kls: dict[int, float] = {}

    def kl_of(count: int) -> float:
        if count not in kls:
            kls[count] = kl_with_plan(model, plan_for(count), igia, config, guard, dense)
        return kls[count]

    rows = sum(int(b["input_ids"].shape[0]) for b in guard)
    tokens = sum(int(b["attention_mask"].sum()) for b in guard)
    report = GuardReport(rows=rows, tokens=tokens, threshold=config.max_kl)
    if config.prune_layers == "auto":
        count = largest_within(1, ceiling, kl_of, config.max_kl)
        if count is None:
            raise GuardError(
                f"prune_layers=auto: removing even one layer moves the predictions on {rows} held-out rows by more "
                f"than max_kl={config.max_kl} (KL {kls[1]:.3f} nats/token); raise --gradprune_max_kl or set "
                "--gradprune_prune_layers"
            )
    else:
        count = ceiling
    report.kl = kl_of(count)
    if not report.ok:
        report.suggestion = largest_within(1, count - 1, kl_of, config.max_kl)
    report.kls = kls
    report.dense_loss = mean_loss(model, guard)
    report.pruned_loss = loss_with_plan(model, plan_for(count), igia, config, guard)
    return count, report


def save_pruned(
    model: nn.Module,
    result: PruneResult,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    overwrite: bool = False,
    extra_files: dict[str, Any] | None = None,
    after_save: Sequence[Callable[[Path], None]] = (),
) -> Path:
    """Save the pruned model as a plain HF checkpoint with the report and score plot inside it.

    ``extra_files`` maps more file names to JSON-able contents (e.g. swift's args.json), ``Raw`` bytes, or
    writers called with the file's path after the model is saved. ``after_save`` steps run last, in order,
    with the folder (``surgery.save_checkpoint``).
    """
    files = _report_files(result, extra_files)
    return save_checkpoint(model, out_dir, tokenizer=tokenizer, overwrite=overwrite, extra_files=files,
                           after_save=after_save)  # fmt: skip


def _report_files(result: PruneResult, extra_files: dict[str, Any] | None) -> dict[str, Callable[[Path], None]]:
    """Writers of the report, the score plot and ``extra_files`` (JSON contents), by file name."""
    files = {
        REPORT_NAME: lambda path: write_json(path, result.report),
        PLOT_NAME: lambda path: plot_layer_scores(path, result.report),
    }
    for name, content in (extra_files or {}).items():
        if callable(content):  # a writer, called with the file's path once the model is saved
            files[name] = content
        elif isinstance(content, Raw):
            files[name] = lambda path, content=content: path.exists() or path.write_bytes(content)
        else:
            files[name] = lambda path, content=content: write_json(path, content)
    return files


class Raw(bytes):
    """File contents copied as they are (``_report_files`` writes JSON for anything else)."""
