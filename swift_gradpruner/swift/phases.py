"""Phase 1 (the LoRA probe whose gradients are captured), the rank-0 prune, and the argument
rewriting between the phases."""

from __future__ import annotations

import gc
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..config import GradPruneConfig
from ..importance import IGIAAccumulator
from .callback import IGIACaptureCallback
from .holdout import encode_batches, first_rows, hold_out
from .preflight import parse_sft_args, world_size
from .reuse import phase1_settings, swift_version

PHASE1_DIR = "phase1"


def run_phase1_and_prune(argv: list[str], args, config: GradPruneConfig, key: str, pruned_dir: Path) -> None:
    from swift.utils import get_logger, is_master

    logger = get_logger()
    phase1_dir = pruned_dir.parent / PHASE1_DIR
    accumulator = IGIAAccumulator(keep_factors=is_master())
    phase1_args = parse_sft_args(phase1_argv(argv, args, config, phase1_dir))
    phase1 = _phase1_pipeline_class()(phase1_args, config, accumulator)
    phase1.main()
    capture = phase1.capture
    logger.info(
        f"[GradPruner] phase 1 done: LoRA gradients of {capture.captured} optimizer steps captured "
        f"(of the run's {capture.total_steps}); pruning on rank 0 (phase 1 saves no checkpoint by design)"
    )
    phase1_info = {
        "phase1": {
            "steps_planned": capture.steps,
            "steps_captured": capture.captured,
            "total_steps": capture.total_steps,
            "lora_rank": phase1.args.lora_rank,
            "lora_alpha": phase1.args.lora_alpha,
            "target_modules": phase1.args.target_modules,
            "learning_rate": phase1.args.learning_rate,
            "deepspeed": bool(args.deepspeed),
            "world_size": world_size(),
            "output_dir": str(phase1_dir),
        },
        "config_hash": key,
        "source_model": args.model_dir,
        "swift_settings": phase1_settings(args),
    }
    held_out = {"guard": phase1.guard, "calibration": phase1.calibration}
    del phase1, capture
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if is_master():
        swift_args = {"swift_version": swift_version(), "model": str(pruned_dir), "model_type": args.model_type,
                      "template": args.template, "task_type": "causal_lm", "tuner_type": "full"}  # fmt: skip
        prune_checkpoint(args.model_dir, accumulator, config, pruned_dir, phase1_info, swift_args, **held_out)
    del accumulator
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    logger.info(f"[GradPruner] pruned model saved: {pruned_dir}")


def prune_checkpoint(model_dir: str, accumulator: IGIAAccumulator, config: GradPruneConfig, out_dir: Path,
                     extra: dict[str, Any], swift_args: dict[str, Any],
                     guard=None, calibration=None) -> None:  # fmt: skip
    """Load the base checkpoint in its own dtype, prune and merge it, save it with its report.

    The model runs on the GPU when there is one and it fits (forward passes of the guard and the
    criteria, the merge, the timing), else on the CPU. ``swift_args`` becomes the checkpoint's
    args.json, from which ``swift infer --model`` and ``swift export`` take model_type and template
    (``swift sft`` ignores it: load_args is off there). ``guard`` and ``calibration`` are encoded
    batches of held-out and of training rows (holdout.py).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..prune import prune_model, save_pruned

    with _zero3_init_off():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", device_map="cpu")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _onto(model, device)
    from swift.utils import get_logger

    result = prune_model(model, accumulator, config, calibration=calibration, guard=guard, device=device, extra=extra,
                         log=get_logger().info)  # fmt: skip
    if result.guard is not None and not result.guard.ok:
        get_logger().warning(f"[GradPruner] WARNING: {result.guard.message(len(result.plan.removed))}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    get_logger().info(f"[GradPruner] saving the pruned model to {out_dir} ...")
    save_pruned(model, result, out_dir, tokenizer=tokenizer, overwrite=True, extra_files={"args.json": swift_args})


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


def phase1_argv(argv: list[str], args, config: GradPruneConfig, out_dir: Path) -> list[str]:
    """The user's arguments turned into phase 1: plain LoRA, no saving, evaluation or resuming."""
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
        verdict = "" if guard["ok"] else f", OVER the +{guard['threshold']:.0%} threshold"
        text += (
            f"; loss on {guard['rows']} held-out rows {guard['dense_loss']:.3f} dense -> {guard['pruned_loss']:.3f} "
            f"pruned ({guard['increase']:+.0%}{verdict})"
        )
    timing = report.get("inference_benchmark", {})
    if "prefill_speedup" in timing:
        text += (
            f"; inference on {timing['device']}: prefill {timing['prefill_speedup']:.2f}x, "
            f"generation {timing['generate_speedup']:.2f}x faster than dense"
        )
    return text


def _phase1_pipeline_class():
    from swift.pipelines import SwiftSft

    class GradPrunePhase1(SwiftSft):
        """SwiftSft that adds the gradient-capture callback to its trainer."""

        def __init__(self, args, config: GradPruneConfig, accumulator: IGIAAccumulator) -> None:
            self.gradprune_config = config
            self.accumulator = accumulator
            self.capture = None
            self.held_out = None
            self.train_rows = None
            self.guard: list | None = None
            self.calibration: list | None = None
            super().__init__(args)

        def _get_dataset(self):
            from swift.utils import get_logger

            train, val = super()._get_dataset()
            rows = self.gradprune_config.guard_rows
            train, self.held_out = hold_out(train, rows, self.args.data_seed)
            self.train_rows = train
            if rows and self.held_out is None:
                get_logger().warning(
                    f"[GradPruner] quality guard off: it needs an in-memory training set of at least {4 * rows} rows "
                    "(not streaming) to hold out --gradprune_guard_rows of them"
                )
            return train, val

        def train(self, trainer):
            from swift.utils import is_master

            if is_master():
                batch = self.args.per_device_train_batch_size
                if self.held_out is not None:
                    self.guard = encode_batches(self.template, list(self.held_out), batch)
                if self.gradprune_config.needs_calibration:
                    rows = first_rows(self.train_rows, self.gradprune_config.calibration_rows, self.args.data_seed)
                    self.calibration = encode_batches(self.template, rows, batch)
            self.capture = IGIACaptureCallback(
                trainer, self.gradprune_config.phase1_steps, self.accumulator, accumulate=is_master()
            )
            trainer.add_callback(self.capture)
            try:
                return super().train(trainer)
            finally:
                self.capture.trainer = None

    return GradPrunePhase1
