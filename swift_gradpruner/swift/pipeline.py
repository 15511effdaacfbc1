"""The GradPruner run inside ms-swift: (phase-1 LoRA probe, or just the held-out rows) -> prune -> the
user's own run.

1. Parse the user's ``swift sft`` arguments and check everything that can be checked before a model
   is loaded (architecture, layer counts, LoRA targets, the data's size, the phase-1 step count).
2. Rank 0 fetches the weights of a hub model (hub.py) and decides, for every rank (decide.py): reuse
   a pruned model, prune from a saved state, or run phase 1 when an IGIA score or a merge reads its
   gradients; without phase 1 it prepares the held-out rows while deciding (their hash is the rows key).
3. Phase 1 (when needed): the same run with LoRA on the user's data, template and schedule, stopped
   after t optimizer steps while its gradients are captured.
4. Rank 0 reloads the base weights from disk, chooses, merges and removes layers, and saves the
   pruned model with its report under ``<output_dir>/gradprune/model``.
5. Phase 2: the user's run, unchanged except ``--model`` now names the pruned checkpoint, so its
   checkpoints are ordinary swift checkpoints that ``swift infer``/``swift export`` load alone.

The report and the last log line give the whole run's time against an estimate of a dense run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ..config import GradPruneConfig, GradPruneConfigError
from ..payoff import WholeRun
from ..report import REPORT_NAME, read_report, update_report
from .decide import PHASE1, REUSE, Decision, after_phase1, decide
from .distributed import check_shared_output_dir, last_line, on_rank0
from .hub import fetch_weights
from .phase1 import discard_phase1, record_failure, run_phase1
from .phases import drop_flags, hand_back_cuda_memory, prune_from_state, summary
from .preflight import check_argv_paths, parse_sft_args, preflight, remove_empty_output_dirs
from .reuse import link_model, remove_stale_temporaries


def run(argv: list[str], config: GradPruneConfig) -> dict[str, Any]:
    from swift.pipelines import SwiftSft
    from swift.utils import get_logger, is_master

    start = time.perf_counter()
    startup = _process_age()
    logger = get_logger()
    check_argv_paths(argv)
    # --resume_only_model makes swift's parser point --model (full) or --adapters (LoRA) at the checkpoint;
    # GradPruner's own view keeps the user's base model, and phase 2 gets the flag as typed.
    args = parse_sft_args(drop_flags(argv, {"--resume_only_model"}))
    for line in config.unused_options():
        logger.warning(f"[GradPruner] WARNING: {line}")
    try:
        facts = preflight(args, config)
        check_shared_output_dir(args.output_dir)
        stale = on_rank0(lambda: remove_stale_temporaries(args.output_dir), "removing stale temporaries")
        if stale:
            logger.info(f"[GradPruner] removed what an interrupted run left half-written: {', '.join(stale)}")
        fetched = on_rank0(lambda: fetch_weights(args), "downloading the model's weights")
        decision = decide(args, config, facts)
    except GradPruneConfigError:
        remove_empty_output_dirs(args)
        raise
    stages = {"start-up and checks": time.perf_counter() - start - decision.rows_s - (fetched or 0.0)}
    if fetched:
        stages["downloading the weights"] = fetched
    if decision.rows_s:
        stages["held-out rows"] = decision.rows_s
    decision, prepared = _prepare_model(argv, args, config, decision, zero_dropout=facts.wraps_parameters)
    stages.update(prepared)
    pruned_dir = Path(decision.pruned_dir)
    report = read_report(pruned_dir)
    logger.info(f"[GradPruner] {summary(report)}; phase 2 trains {pruned_dir}")
    phase2 = [*argv, "--model", str(pruned_dir), "--model_type", args.model_type, "--template", args.template,
              "--output_dir", args.output_dir, "--add_version", "false"]  # fmt: skip
    hand_back_cuda_memory()  # the dense-vs-pruned timing ran on the GPU since phase 1
    phase2_start = time.perf_counter()
    result = SwiftSft(parse_sft_args(phase2)).main()
    end = time.perf_counter()
    whole = _whole_run(report, stages, startup, end - start, end - phase2_start, result.get("log_history") or [])
    if is_master():
        update_report(pruned_dir, whole_run=whole.to_dict())
    logger.info(f"[GradPruner] {whole.line()}")
    result["gradprune"] = {"pruned_model": str(pruned_dir), "report": str(pruned_dir / REPORT_NAME),
                           "whole_run": whole.to_dict()}  # fmt: skip
    return result


def _prepare_model(argv: list[str], args, config: GradPruneConfig, decision: Decision, *,
                   zero_dropout: bool) -> tuple[Decision, dict[str, float]]:  # fmt: skip
    """Make the pruned model of ``decision`` exist in this run's version folder: the decision (completed
    after phase 1) and the seconds by stage. ``zero_dropout``: phase 1's LoRA wraps fused experts
    (preflight's ModelFacts.wraps_parameters)."""
    from swift.utils import get_logger

    logger = get_logger()
    if decision.action == REUSE:
        source, pruned_dir = Path(decision.source_dir), Path(decision.pruned_dir)
        if source == pruned_dir:
            logger.info(f"[GradPruner] reusing the pruned model of an earlier run with the same settings: {source}")
            return decision, {}
        how = on_rank0(lambda: link_model(source, pruned_dir), "linking the earlier pruned model")
        logger.info(f"[GradPruner] reusing the pruned model of an earlier run with the same settings: {source} "
                    f"({how} into {pruned_dir}: its checkpoints do not depend on the earlier folder)")  # fmt: skip
        return decision, {}
    state = Path(decision.state_dir)
    stages: dict[str, float] = {}
    created = decision.action == PHASE1
    if created:
        start = time.perf_counter()
        _phase1_or_one_line(argv, args, config, decision, zero_dropout)
        decision = after_phase1(args, config, decision)
        stages["phase 1"] = time.perf_counter() - start
    elif decision.phase1_key is not None:
        logger.info(f"[GradPruner] an earlier run with the same settings saved its phase-1 state: pruning from {state}")
    pruned_dir = Path(decision.pruned_dir)
    prune_s = prune_from_state(args, config, state, decision.prune_key, pruned_dir, created=created)
    measured = (read_report(pruned_dir) or {}).get("stage_seconds", {})
    names = {"load": "loading the model", "choice": "choosing layers (criterion, guard)",
             "surgery": "merge and removal", "timing": "dense-vs-pruned timing"}  # fmt: skip
    stages.update({names.get(k, k): v for k, v in measured.items()})
    stages["saving and the rest of pruning"] = max(prune_s - sum(measured.values()), 0.0)
    return decision, stages


def _phase1_or_one_line(argv: list[str], args, config: GradPruneConfig, decision: Decision,
                        zero_dropout: bool) -> None:  # fmt: skip
    """Phase 1; a failure ends the run with one line naming the file that holds the full error."""
    state = Path(decision.state_dir)
    try:
        run_phase1(argv, args, config, decision.phase1_key, decision.material, state, zero_dropout=zero_dropout)
    except GradPruneConfigError:  # stopped on purpose (e.g. no usable gradient): nothing worth keeping
        discard_phase1(state)
        remove_empty_output_dirs(args)
        raise
    except Exception as error:
        log = record_failure(state, error)  # phase 1's own logs stay beside it
        if os.environ.get("GRADPRUNE_DEBUG"):
            raise
        raise GradPruneConfigError(
            f"phase 1 failed: {type(error).__name__}: {last_line(error)}; the full error and phase 1's logs are in "
            f"{log.parent} ({log.name}; GRADPRUNE_DEBUG=1 also prints the traceback)"
        ) from error


def _process_age() -> float:
    """Seconds since this process started (its imports: a dense swift sft run pays them too)."""
    try:
        import psutil

        return max(time.time() - psutil.Process().create_time(), 0.0)
    except Exception:  # psutil missing or no access: count from here
        return 0.0


def _whole_run(report: dict, stages: dict[str, float], startup: float, total: float, phase2: float,
               history: list) -> WholeRun:  # fmt: skip
    """The whole run's time against a dense run estimated from phase 2 and the dense/pruned step ratio."""
    train = next((float(row["train_runtime"]) for row in reversed(history) if "train_runtime" in row), phase2)
    timing = report.get("inference_benchmark") or {}
    prefill = (timing.get("workloads") or {}).get("prefill")
    if prefill:
        ratio, source = float(prefill["ratio"]), f"measured: prefill on {timing['device']}"
    else:
        ratio, source = float(report.get("kept_compute_fraction", 1.0)), "estimated: the FLOP fraction kept"
    return WholeRun(total_s=startup + total, startup_s=startup, stages_s=stages, phase2_s=phase2,
                    phase2_train_s=train, step_ratio=ratio, ratio_source=source)  # fmt: skip
