"""Phase 1 (the LoRA probe whose gradients are captured), the rank-0 prune, and the argument
rewriting between the phases."""

from __future__ import annotations

import contextlib
import gc
import json
import shutil
import weakref
from pathlib import Path
from typing import Any

import torch

from ..bench.inference import describe
from ..config import GradPruneConfig, GradPruneConfigError
from ..importance import IGIAAccumulator, load_state, save_state
from ..prune import prune_checkpoint
from .callback import IGIACaptureCallback
from .distributed import barrier
from .holdout import BATCHES_FILE, encode_batches, first_rows, hold_out, load_batches, save_batches
from .preflight import parse_sft_args, world_size
from .reuse import PHASE1_FILE, phase1_settings, swift_version

PHASE1_DIR = "phase1"


def run_phase1(argv: list[str], args, config: GradPruneConfig, key: str, state_dir: Path,
               zero_dropout: bool = False) -> None:  # fmt: skip
    """Phase 1 on every rank; rank 0 writes the IGIA state (factors step by step, then the sums,
    the held-out and calibration rows and the run's facts) to ``state_dir``, atomically.
    ``zero_dropout``: phase 1's own LoRA (a non-LoRA run) wraps fused experts and needs dropout 0."""
    from swift.utils import get_logger, is_master

    logger = get_logger()
    phase1_dir = state_dir.parent / PHASE1_DIR
    building = state_dir.with_name(f".{state_dir.name}.building")
    if is_master():
        shutil.rmtree(building, ignore_errors=True)
    accumulator = IGIAAccumulator(keep_factors=is_master(), factor_dir=building if is_master() else None)
    phase1_args = parse_sft_args(phase1_argv(argv, args, config, phase1_dir, zero_dropout))
    phase1 = _phase1_pipeline_class()(phase1_args, config, accumulator)
    phase1.main()
    capture = phase1.capture
    logger.info(
        f"[GradPruner] phase 1 done: LoRA gradients of {capture.captured} optimizer steps captured "
        f"(of the run's {capture.total_steps}); pruning on rank 0 (phase 1 saves no checkpoint by design)"
    )
    if is_master():
        info = {
            "phase1_key": key,
            "phase1": {
                "steps_planned": capture.steps, "steps_captured": capture.captured, "total_steps": capture.total_steps,
                "lora_rank": phase1.args.lora_rank, "lora_alpha": phase1.args.lora_alpha,
                "target_modules": phase1.args.target_modules, "learning_rate": phase1.args.learning_rate,
                "deepspeed": bool(args.deepspeed), "world_size": world_size(), "output_dir": str(phase1_dir),
            },
            "source_model": args.model_dir,
            "swift_settings": phase1_settings(args),
            "swift_args": {"model_type": args.model_type, "template": args.template},
        }  # fmt: skip
        save_state(accumulator, building)
        save_batches(building / BATCHES_FILE, {"guard": phase1.guard or [], "calibration": phase1.calibration or []})
        (building / PHASE1_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        shutil.rmtree(state_dir, ignore_errors=True)
        building.rename(state_dir)
    refs = phase1.training_objects
    del phase1, capture, accumulator
    gc.collect()
    hand_back_cuda_memory()
    alive = [name for name, ref in refs.items() if ref() is not None]
    if alive:
        logger.warning(f"[GradPruner] phase 1 left {', '.join(alive)} alive: their memory is not handed back "
                       "before phase 2")  # fmt: skip
    else:
        logger.info(f"[GradPruner] phase 1 released its {', '.join(refs)}{_cuda_memory()}")
    barrier()


def training_objects(trainer) -> dict[str, weakref.ref]:
    """Weak references to what holds phase 1's memory: the trainer, its model, optimizer and engine."""
    objects = {
        "trainer": trainer,
        "model": trainer.model,
        "optimizer": trainer.optimizer,
        "lr scheduler": trainer.lr_scheduler,
        "DeepSpeed engine": getattr(trainer, "deepspeed", None),
    }
    return {name: weakref.ref(obj) for name, obj in objects.items() if obj is not None}


def _release_zero3_globals() -> None:
    """Drop what DeepSpeed's ZeRO-3 keeps in module-level state after training (deepspeed 0.19):

    * the modules whose forward is running sit on ``parameter_offload.FWD_MODULE_STACK``; the last one
      of phase 1 stays there, holding the whole phase-1 model;
    * ``PartitionedParameterCoordinator.__params_to_release`` is a ``functools.lru_cache`` on a method,
      i.e. one cache for the class whose keys hold every coordinator and submodule it ever saw, so the
      phase-1 model and engine would stay alive for the life of the process. Clearing it only costs the
      next engine a recomputation.
    """
    import sys

    offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    if offload is not None and isinstance(getattr(offload, "FWD_MODULE_STACK", None), list):
        offload.FWD_MODULE_STACK.clear()
    coordinator = sys.modules.get("deepspeed.runtime.zero.partitioned_param_coordinator")
    cls = getattr(coordinator, "PartitionedParameterCoordinator", None)
    method = vars(cls).get("_PartitionedParameterCoordinator__params_to_release") if cls is not None else None
    for cached in [method, *(cell.cell_contents for cell in getattr(method, "__closure__", None) or ())]:
        if callable(getattr(cached, "cache_clear", None)):
            cached.cache_clear()


def hand_back_cuda_memory() -> None:
    """Return cached CUDA blocks to the device and restart the peak statistics, so that what swift logs
    as the next phase's ``memory(GiB)`` (torch's peak reserved memory) is that phase's own peak."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _cuda_memory() -> str:
    if not torch.cuda.is_available():
        return ""
    return f" (CUDA memory allocated now: {torch.cuda.memory_allocated() / 2**20:.0f} MiB)"


def discard_phase1(state_dir: Path) -> None:
    """Remove what a failed phase 1 wrote (its logs, a half-built state), and the gradprune folder if
    that leaves it empty; a finished state or pruned model of an earlier run there is kept."""
    shutil.rmtree(state_dir.parent / PHASE1_DIR, ignore_errors=True)
    shutil.rmtree(state_dir.with_name(f".{state_dir.name}.building"), ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty: an earlier run's work stays
        state_dir.parent.rmdir()


def prune_from_state(args, config: GradPruneConfig, state_dir: Path, key: str, pruned_dir: Path) -> None:
    """Rank 0 prunes the base model from the saved phase-1 state; every rank waits for it."""
    from swift.utils import get_logger, is_master

    batches = load_batches(state_dir / BATCHES_FILE)  # small; every rank checks, so none waits on an error
    if config.needs_calibration and not batches["calibration"]:
        raise GradPruneConfigError(
            f"--gradprune_score {config.score} runs the model on calibration rows and the saved phase 1 in "
            f"{state_dir} has none (a streaming dataset): use --gradprune_score squared or norm"
        )
    if is_master():
        info = json.loads((state_dir / PHASE1_FILE).read_text())
        extra = {key_: info[key_] for key_ in ("phase1", "source_model", "swift_settings")}
        extra.update(config_hash=key, phase1_key=info["phase1_key"], phase1_state=str(state_dir))
        swift_args = {"swift_version": swift_version(), "model": str(pruned_dir), **info["swift_args"],
                      "task_type": "causal_lm", "tuner_type": "full"}  # fmt: skip
        prune_checkpoint(args.model_dir, load_state(state_dir), config, pruned_dir, extra, swift_args,
                         guard=batches["guard"] or None, calibration=batches["calibration"] or None,
                         log=get_logger().info, warn=get_logger().warning)  # fmt: skip
    barrier()
    get_logger().info(f"[GradPruner] pruned model saved: {pruned_dir}")


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
        verdict = "" if guard["ok"] else f", OVER the +{guard['threshold']:.0%} threshold"
        text += (
            f"; loss on {guard['rows']} held-out rows {guard['dense_loss']:.3f} dense -> {guard['pruned_loss']:.3f} "
            f"pruned ({guard['increase']:+.0%}{verdict})"
        )
    if "inference_benchmark" in report:
        text += f"; {describe(report['inference_benchmark'])}"
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
            self.training_objects: dict[str, weakref.ref] = {}
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
            from datasets import Dataset
            from swift.utils import is_master

            if is_master():
                batch = self.args.per_device_train_batch_size
                if self.held_out is not None:
                    self.guard = encode_batches(self.template, list(self.held_out), batch)
                # Saved whatever the score, so a re-prune from this state may use any criterion.
                if isinstance(self.train_rows, Dataset):
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
                self.training_objects = training_objects(trainer)
                # accelerate's call "between two trainings": destroys the DeepSpeed engine, whose gradient
                # hooks on the parameters otherwise keep it and the model alive through phase 2.
                trainer.accelerator.free_memory()
                _release_zero3_globals()

    return GradPrunePhase1
