"""Phase 1: the user's run as a LoRA probe whose gradients are captured, stopped after t steps.

It runs only when something reads the gradients (an IGIA score or a merge). The per-step gradient
factors are written only when a merge reads them (or ``keep_state`` asks to keep them); after phase 1
the state is checked: fewer than two steps with non-zero gradients means the scores say nothing, and
the run stops before saving such a state. A phase 1 that fails leaves its logs and the full error in
``<output_dir>/gradprune/phase1``.
"""

from __future__ import annotations

import contextlib
import gc
import shutil
import traceback
import weakref
from functools import partial
from pathlib import Path

from ..config import FEWEST_STEPS, GradPruneConfig, GradPruneConfigError
from ..importance import IGIAAccumulator
from .callback import IGIACaptureCallback
from .distributed import broadcast_from_rank0, on_rank0
from .phases import hand_back_cuda_memory, phase1_argv
from .preflight import parse_sft_args, world_size
from .rows import BUILDING_SUFFIX, encode_rows, split_off, state_info, write_state

PHASE1_DIR = "phase1"
ERROR_LOG = "error.log"


def run_phase1(argv: list[str], args, config: GradPruneConfig, key: str, material: dict, state_dir: Path,
               zero_dropout: bool = False) -> None:  # fmt: skip
    """Phase 1 on every rank; rank 0 writes the state (the IGIA sums, the factors when a merge reads
    them, the held-out and calibration rows and the run's facts) to ``state_dir``, atomically.
    ``zero_dropout``: phase 1's own LoRA (a non-LoRA run) wraps fused experts and needs dropout 0."""
    from swift.utils import get_logger, is_master

    logger = get_logger()
    phase1_dir = state_dir.parent / PHASE1_DIR
    building = state_dir.with_name(f".{state_dir.name}{BUILDING_SUFFIX}")
    keep = is_master() and config.needs_factors
    if is_master():
        shutil.rmtree(building, ignore_errors=True)
    accumulator = IGIAAccumulator(keep_factors=keep, factor_dir=building if keep else None)
    phase1_args = parse_sft_args(phase1_argv(argv, args, config, phase1_dir, zero_dropout))
    phase1 = _phase1_pipeline_class()(phase1_args, config, accumulator, args.split_dataset_ratio)
    phase1.main()
    capture = phase1.capture
    logger.info(
        f"[GradPruner] phase 1 done: LoRA gradients of {capture.captured} optimizer steps captured "
        f"(of the run's {capture.total_steps}); pruning on rank 0 (phase 1 saves no checkpoint by design)"
    )
    problem = broadcast_from_rank0(on_rank0(partial(_degenerate, accumulator), "checking the captured gradients"))
    if problem:
        raise GradPruneConfigError(problem)
    save = partial(_save_state, args, key, material, state_dir, phase1, accumulator, keep)
    on_rank0(save, "saving the phase-1 state")  # every rank waits until the state is complete
    del save
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


def _save_state(args, key: str, material: dict, state_dir: Path, phase1, accumulator: IGIAAccumulator,
                keep: bool) -> None:  # fmt: skip
    """Rank 0: write the phase-1 state (IGIA sums, factors when kept, held-out rows, the run's facts)."""
    from swift.utils import get_logger

    capture, phase1_dir = phase1.capture, state_dir.parent / PHASE1_DIR
    facts = {
        "steps_planned": capture.steps, "steps_captured": capture.captured, "total_steps": capture.total_steps,
        "lora_rank": phase1.args.lora_rank, "lora_alpha": phase1.args.lora_alpha,
        "target_modules": phase1.args.target_modules, "learning_rate": phase1.args.learning_rate,
        "deepspeed": bool(args.deepspeed), "world_size": world_size(), "output_dir": str(phase1_dir),
    }  # fmt: skip
    batches = {"guard": phase1.guard or [], "calibration": phase1.calibration or []}
    write_state(state_dir, state_info(args, key, batches, facts, material), batches, accumulator)
    disk = sum(p.stat().st_size for p in state_dir.iterdir() if p.is_file())
    factors = "without gradient factors (no merge reads them)"
    if keep:
        factors = (f"with {accumulator.counts.used} steps of LoRA gradient factors (deleted after pruning "
                   "unless --gradprune_keep_state true)")  # fmt: skip
    get_logger().info(f"[GradPruner] phase-1 state saved in {state_dir}: {disk / 2**20:.1f} MiB on disk, {factors}")


def _degenerate(accumulator: IGIAAccumulator) -> str | None:
    """Why the captured gradients cannot rank layers, or None when they can."""
    counts = accumulator.counts
    informative = counts.used - counts.zero
    if informative >= FEWEST_STEPS:
        return None
    skipped = f" ({counts.skipped_nonfinite} more skipped for NaN/inf gradients)" if counts.skipped_nonfinite else ""
    return (
        f"phase 1 captured {counts.used} optimizer steps{skipped}, of which {informative} had non-zero LoRA "
        f"gradients (step 1's are zero: LoRA B starts at 0); the IGIA scores need at least {FEWEST_STEPS}, so "
        "nothing was saved: raise --gradprune_steps, check --learning_rate (0 keeps B at 0), or choose layers "
        "without gradients (e.g. --gradprune_score block_influence --gradprune_merge_layers 0)"
    )


def record_failure(state_dir: Path, error: BaseException) -> Path:
    """Keep phase 1's logs and write the full error next to them; drop a half-built state."""
    from swift.utils import get_dist_setting

    shutil.rmtree(state_dir.with_name(f".{state_dir.name}{BUILDING_SUFFIX}"), ignore_errors=True)
    folder = state_dir.parent / PHASE1_DIR
    folder.mkdir(parents=True, exist_ok=True)
    rank = max(get_dist_setting()[0], 0)
    log = folder / (ERROR_LOG if rank == 0 else f"error-rank{rank}.log")
    log.write_text("".join(traceback.format_exception(error)), encoding="utf-8")
    return log


def discard_phase1(state_dir: Path) -> None:
    """Remove what a phase 1 stopped on purpose wrote (its logs, a half-built state), and the gradprune
    folder if that leaves it empty; a finished state or pruned model of an earlier run there is kept."""
    shutil.rmtree(state_dir.parent / PHASE1_DIR, ignore_errors=True)
    shutil.rmtree(state_dir.with_name(f".{state_dir.name}{BUILDING_SUFFIX}"), ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty: an earlier run's work stays
        state_dir.parent.rmdir()


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


def _cuda_memory() -> str:
    import torch

    if not torch.cuda.is_available():
        return ""
    return f" (CUDA memory allocated now: {torch.cuda.memory_allocated() / 2**20:.0f} MiB)"


def _phase1_pipeline_class():
    from swift.pipelines import SwiftSft

    class GradPrunePhase1(SwiftSft):
        """SwiftSft that adds the gradient-capture callback to its trainer."""

        def __init__(self, args, config: GradPruneConfig, accumulator: IGIAAccumulator, split_ratio: float) -> None:
            self.gradprune_config = config
            self.accumulator = accumulator
            self.user_split_ratio = split_ratio
            self.capture = None
            self.held_out = None
            self.train_rows = None
            self.guard: list | None = None
            self.calibration: list | None = None
            self.training_objects: dict[str, weakref.ref] = {}
            super().__init__(args)

        def _get_dataset(self):
            from swift.utils import get_logger

            # Phase 1 does not evaluate (eval_strategy no), which makes swift set split_dataset_ratio to 0:
            # load with the user's ratio, so that phase 2's validation rows are split off exactly as phase 2
            # splits them and are neither trained on here nor taken as guard or calibration rows.
            saved, self.args.split_dataset_ratio = self.args.split_dataset_ratio, self.user_split_ratio
            try:
                train, _ = super()._get_dataset()
            finally:
                self.args.split_dataset_ratio = saved
            self.train_rows, self.held_out = split_off(train, self.gradprune_config, self.args.data_seed,
                                                       get_logger().warning)  # fmt: skip
            return self.train_rows, None

        def train(self, trainer):
            from swift.utils import is_master

            # Every rank meets here: a failure to encode the rows on rank 0 stops them all with one line
            # instead of leaving the others in training's first collective.
            encode = partial(encode_rows, self.template, self.train_rows, self.held_out, self.gradprune_config,
                             self.args.per_device_train_batch_size, self.args.data_seed)  # fmt: skip
            batches = on_rank0(encode, "encoding the held-out and calibration rows")
            if batches is not None:
                self.guard, self.calibration = batches["guard"], batches["calibration"]
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
