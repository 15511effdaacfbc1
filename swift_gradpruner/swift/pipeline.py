"""The two-phase GradPruner run inside ms-swift: phase-1 LoRA probe -> prune -> the user's own run.

1. Parse the user's ``swift sft`` arguments and check everything that can be checked before a
   model is loaded (architecture, layer counts, LoRA targets, phase-1 step count).
2. Phase 1: the same run with LoRA (the user's LoRA settings, or GradPruner's when the run is not
   LoRA), on the user's data, template and schedule, stopped after t optimizer steps; an
   IGIACaptureCallback reads the LoRA gradients of every step.
3. Rank 0 reloads the base weights from disk, scores, removes and merges layers, and saves the
   pruned model with its report under ``<output_dir>/gradprune/model``. The phase-1 LoRA weights
   are discarded.
4. Phase 2: the user's run, unchanged except ``--model`` now names the pruned checkpoint, so its
   checkpoints are ordinary swift checkpoints that ``swift infer``/``swift export`` load alone.

A finished phase 1 is reused when a run is repeated (e.g. after a crash): its report carries a hash
of every setting that shapes phase 1, and a pruned model is reused only if the hash matches.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..config import GradPruneConfig, GradPruneConfigError
from ..report import REPORT_NAME, read_report
from .distributed import check_shared_output_dir
from .phases import discard_phase1, hand_back_cuda_memory, prune_from_state, run_phase1, summary
from .preflight import check_argv_paths, parse_sft_args, preflight, remove_empty_output_dirs
from .reuse import (
    GRADPRUNE_DIR,
    MODEL_DIR,
    STATE_DIR,
    find_pruned_model,
    find_state,
    phase1_key,
    prune_key,
    pruned_model_of_checkpoint,
)


def run(argv: list[str], config: GradPruneConfig) -> dict[str, Any]:
    from swift.pipelines import SwiftSft
    from swift.utils import get_logger

    logger = get_logger()
    check_argv_paths(argv)
    args = parse_sft_args(argv)
    first = phase1_key(args, config)
    key = prune_key(first, config)
    try:
        wraps_parameters = preflight(args, config)
        check_shared_output_dir(args.output_dir)
        if args.resume_from_checkpoint:
            pruned_dir = pruned_model_of_checkpoint(args.resume_from_checkpoint, key)
        else:
            pruned_dir = find_pruned_model(args, key)
    except GradPruneConfigError:
        remove_empty_output_dirs(args)
        raise
    if pruned_dir is None:
        pruned_dir = Path(args.output_dir) / GRADPRUNE_DIR / MODEL_DIR
        state = find_state(args, first)
        if state is None:
            state = Path(args.output_dir) / GRADPRUNE_DIR / STATE_DIR
            try:
                run_phase1(argv, args, config, first, state, zero_dropout=wraps_parameters)
            except Exception as error:  # one line for the user, no half-made folders left behind
                discard_phase1(state)
                remove_empty_output_dirs(args)
                if os.environ.get("GRADPRUNE_DEBUG"):
                    raise
                message = (str(error).strip().splitlines() or [""])[-1][:500]
                raise GradPruneConfigError(
                    f"phase 1 failed: {type(error).__name__}: {message} (GRADPRUNE_DEBUG=1 shows the traceback)"
                ) from error
        else:
            logger.info(f"[GradPruner] phase 1 of an earlier run with the same settings is saved: pruning from {state}")
        prune_from_state(args, config, state, key, pruned_dir)
    else:
        logger.info(f"[GradPruner] reusing the pruned model of an earlier run with the same settings: {pruned_dir}")
    report = read_report(pruned_dir)
    logger.info(f"[GradPruner] {summary(report)}; phase 2 trains {pruned_dir}")
    phase2 = [*argv, "--model", str(pruned_dir), "--model_type", args.model_type, "--template", args.template,
              "--output_dir", args.output_dir, "--add_version", "false"]  # fmt: skip
    hand_back_cuda_memory()  # the dense-vs-pruned timing ran on the GPU since phase 1
    result = SwiftSft(parse_sft_args(phase2)).main()
    result["gradprune"] = {"pruned_model": str(pruned_dir), "report": str(pruned_dir / REPORT_NAME)}
    return result
