"""One GradPruner step on an in-memory model: score -> select -> merge -> remove, plus its report."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .config import GradPruneConfig
from .importance import IGIAAccumulator, layer_scores
from .inference_timing import compare, time_on_device
from .report import PLOT_NAME, REPORT_NAME, plot_layer_scores, write_json
from .selection import LayerPlan, layers_to_remove, plan_layers
from .surgery import (
    LAYERS_PREFIX,
    merge_removed_layers,
    parameter_counts,
    remove_layers,
    save_checkpoint,
)


@dataclass
class PruneResult:
    plan: LayerPlan
    report: dict[str, Any]


def prune_model(
    model: nn.Module,
    accumulator: IGIAAccumulator,
    config: GradPruneConfig,
    *,
    device: torch.device | str | None = None,
    extra: dict[str, Any] | None = None,
) -> PruneResult:
    """Prune ``model`` in place from the captured gradients and describe what was done.

    ``device`` is where IGIA matrices are rebuilt and merged (default: CPU) and, with
    ``config.benchmark``, where the dense and the pruned model are timed (default: the model's own
    device). ``extra`` is copied into the report (e.g. the phase-1 settings of a swift run).
    """
    per_layer, total_before = parameter_counts(model)
    remove = layers_to_remove(config, per_layer, total_before)
    linear = accumulator.linear_scores(config.score)
    scores, outside = layer_scores(linear, len(per_layer), LAYERS_PREFIX)
    plan = plan_layers(scores, remove, config.merge_layers)
    captured = set(accumulator.linear_names)
    timing_device = device if device is not None else next(model.parameters()).device
    dense = time_on_device(model, timing_device) if config.benchmark else None

    def igia(name: str) -> torch.Tensor | None:
        return accumulator.igia(name, device) if name in captured else None

    fractions = merge_removed_layers(model, plan, igia, config)
    remove_layers(model, plan.removed)
    _, total_after = parameter_counts(model)
    timing = {}
    if dense is not None:
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        pruned = time_on_device(model, timing_device)
        timing["inference_benchmark"] = compare(dense, pruned, torch.device(timing_device).type, dtype)
    report = {
        "gradprune_version": __version__,
        "model_type": model.config.model_type,
        "config": config.to_dict(),
        "steps": asdict(accumulator.counts),
        "num_layers_before": len(per_layer),
        "num_layers_after": len(plan.kept),
        "layer_scores": scores,
        "linear_scores": linear,
        "linears_outside_layers": outside,
        "dropped_layers": list(plan.dropped),
        "merged_layers": {str(k): v for k, v in plan.merged.items()},
        "merge_shortfall": config.merge_layers - len(plan.merged),
        "kept_layers": list(plan.kept),
        "merged_fraction": {str(k): v for k, v in fractions.items()},
        "params_before": total_before,
        "params_after": total_after,
        "params_removed_fraction": 1 - total_after / total_before,
        "factor_store_bytes": accumulator.factor_bytes,
        **timing,
        **(extra or {}),
    }
    return PruneResult(plan=plan, report=report)


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
    files = {
        REPORT_NAME: lambda path: write_json(path, result.report),
        PLOT_NAME: lambda path: plot_layer_scores(path, result.report),
    }
    for name, content in (extra_files or {}).items():
        files[name] = lambda path, content=content: write_json(path, content)
    return save_checkpoint(model, out_dir, tokenizer=tokenizer, overwrite=overwrite, extra_files=files)
