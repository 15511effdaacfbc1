"""Between the phases: the rank-0 prune from a saved state, the argument rewriting for phase 1, and the
one-line summary of a pruned model."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ..bench.inference import describe
from ..config import GradPruneConfig, GradPruneConfigError
from ..importance import drop_factors, load_state
from ..report import update_report
from .distributed import on_rank0
from .holdout import BATCHES_FILE, load_batches
from .keys import model_identity, swift_version
from .reuse import PHASE1_FILE, state_contents
from .rows import REPORTED


def prune_from_state(args, config: GradPruneConfig, state_dir: Path, key: str, pruned_dir: Path, *,
                     created: bool) -> float:  # fmt: skip
    """Rank 0 prunes the base model from the saved state; every rank waits for it and learns whether it
    failed. The state's gradient factors are deleted afterwards if this run wrote them and
    ``keep_state`` is off. Returns the seconds rank 0 took (0 on the other ranks)."""
    from swift.utils import get_logger

    logger = get_logger()
    batches = load_batches(state_dir / BATCHES_FILE)  # small; every rank checks, so none waits on an error
    if config.needs_calibration and not batches["calibration"]:
        raise GradPruneConfigError(
            f"--gradprune_score {config.score} runs the model on calibration rows and the saved state in "
            f"{state_dir} has none (a streaming dataset): use --gradprune_score squared or norm"
        )

    def prune() -> float:
        start = time.perf_counter()
        info = json.loads((state_dir / PHASE1_FILE).read_text())
        contents = state_contents(state_dir)
        extra = {key_: info.get(key_) for key_ in REPORTED}
        extra.update(config_hash=key, phase1_key=info["phase1_key"], phase1_state=str(state_dir))
        swift_args = {"swift_version": swift_version(), "model": str(pruned_dir), **info["swift_args"],
                      "task_type": "causal_lm", "tuner_type": "full"}  # fmt: skip
        accumulator = load_state(state_dir) if contents["igia"] else None
        from ..checkpoint import prune_checkpoint

        prune_checkpoint(args.model_dir, accumulator, config, pruned_dir, extra, swift_args,
                         guard=batches["guard"] or None, calibration=batches["calibration"] or None,
                         log=logger.info, warn=logger.warning)  # fmt: skip
        update_report(pruned_dir, pruned_identity=model_identity(pruned_dir))  # what a resume checks it against
        if created and contents["factors"] and not config.keep_state:
            freed = drop_factors(state_dir)
            logger.info(f"[GradPruner] deleted the phase-1 gradient factors ({freed / 2**20:.1f} MiB) from {state_dir} "
                        "(--gradprune_keep_state true keeps them for re-pruning with merges)")  # fmt: skip
        return time.perf_counter() - start

    seconds = on_rank0(prune, "pruning") or 0.0
    logger.info(f"[GradPruner] pruned model saved: {pruned_dir}")
    return seconds


def hand_back_cuda_memory() -> None:
    """Return cached CUDA blocks to the device and restart the peak statistics, so that what swift logs
    as the next phase's ``memory(GiB)`` (torch's peak reserved memory) is that phase's own peak. Garbage is
    collected first: accelerate's hooks hold reference cycles, whose tensors only the collector frees."""
    if torch.cuda.is_available():
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def phase1_argv(argv: list[str], args, config: GradPruneConfig, out_dir: Path, zero_dropout: bool = False) -> list[str]:
    """The user's arguments turned into phase 1: plain LoRA, no saving, evaluation or resuming.

    A run that is not LoRA gets GradPruner's LoRA (``gradprune_lora_rank``/``_alpha``, all linears; dropout
    0 when ``zero_dropout``: peft's ParamWrapper on fused experts refuses any other). A LoRA run keeps its
    own settings (preflight refuses a dropout ParamWrapper cannot take)."""
    dropped = {"--resume_from_checkpoint", "--resume_only_model"}
    if args.tuner_type != "lora":
        dropped |= {"--target_modules", "--target_regex"}
    argv = drop_flags(argv, dropped)
    overrides = {
        "tuner_type": "lora", "use_dora": "false", "output_dir": str(out_dir), "add_version": "false",
        "save_strategy": "no", "eval_strategy": "no", "load_best_model_at_end": "false", "report_to": "none",
        "push_to_hub": "false", "create_checkpoint_symlink": "false", "model_type": args.model_type,
        "template": args.template,
    }  # fmt: skip
    if args.tuner_type != "lora":
        overrides.update(
            lora_rank=str(config.lora_rank), lora_alpha=str(config.lora_alpha), target_modules="all-linear"
        )
        if zero_dropout:
            overrides.update(lora_dropout="0")
    extra = [token for key, value in overrides.items() for token in (f"--{key}", value)]
    return [*argv, *extra]


def drop_flags(argv: list[str], flags: set[str]) -> list[str]:
    """``argv`` without the given flags and their values."""
    out, skipping = [], False
    for token in argv:
        if token.startswith("--"):
            skipping = token.split("=", 1)[0] in flags
            if skipping:
                continue
        elif skipping:
            continue
        out.append(token)
    return out


def summary(report: dict[str, Any]) -> str:
    merged = ", ".join(f"{k}->{v}" for k, v in report["merged_layers"].items()) or "none"
    before, after = report["num_layers_before"], report["num_layers_after"]
    text = (
        f"removed {before - after} of {before} layers (dropped {report['dropped_layers']}, merged {merged}); "
        f"parameters {report['params_before']:,} -> {report['params_after']:,} "
        f"(-{report['params_removed_fraction']:.1%} of all, -{report['decoder_params_removed_fraction']:.1%} of the "
        "decoder layers)"
    )
    guard = report.get("quality_guard")
    if guard:
        verdict = "within" if guard["ok"] else "OVER"
        text += (
            f"; quality guard on {guard['rows']} held-out rows: KL {guard['kl']:.3f} nats/token from the dense model "
            f"({verdict} the {guard['threshold']:g} threshold), answer loss {guard['dense_loss']:.3f} dense -> "
            f"{guard['pruned_loss']:.3f} pruned"
        )
    if "inference_benchmark" in report:
        text += f"; {describe(report['inference_benchmark'])}"
    return text
