"""What this run does before phase 2, decided once, by rank 0, for every rank.

Reusing a pruned model, pruning from a saved state or running phase 1: each sends the ranks into
different collectives, so ranks that decided on their own (their own version tags, view of the file
system) could hang. Rank 0 computes the keys (keys.py: what each holds and why), decides, and
broadcasts the decision; every rank checks that its own settings, model files and package versions
are rank 0's and, if any rank differs, every rank stops with one line naming the rank and the setting.

Without phase 1 (the default criterion) rank 0 prepares the held-out and calibration rows while
deciding: the rows key is their hash, so the pruned model of an earlier run is reused exactly when the
rows it was chosen on, the model and the pruning options are the same. With phase 1 the rows come out of
phase 1; a saved phase-1 state with the same phase-1 key gives them without it (``after_phase1``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import ADVISED_STEPS, FEWEST_STEPS, GradPruneConfig, GradPruneConfigError
from ..payoff import estimate
from . import keys, reuse
from .distributed import alone, broadcast_from_rank0, is_distributed, on_rank0, one_line
from .holdout import BATCHES_FILE, load_batches
from .preflight import ModelFacts, estimate_total_steps, training_rows, world_size
from .rows import prepare_rows

REUSE, PRUNE, PHASE1 = "reuse", "prune", "phase1"
"""Reuse a pruned model; prune from a saved state (rows, and phase 1's gradients when it ran); run phase 1."""
ZERO_B_INITS = (True, "true", "True", "gaussian")
"""peft LoRA initialisations that start B at 0 (swift's default is True): step 1's gradient is zero."""


@dataclass(frozen=True)
class Decision:
    action: str
    pruned_dir: str | None
    """Where phase 2's base model is (or will be) in this run's version folder; PHASE1: known after it."""
    prune_key: str | None
    phase1_key: str | None = None
    """Only when phase 1 runs or its saved state is used."""
    source_dir: str | None = None
    """REUSE: the earlier model, linked into ``pruned_dir`` when it lives elsewhere."""
    state_dir: str | None = None
    """PRUNE: the saved state to prune from; PHASE1: where the new state goes."""
    material: dict[str, Any] = field(default_factory=dict)
    """PHASE1: what the new state's phase1.json records of what made it (model identity, data, settings,
    versions); the prune key after phase 1 takes the model identity from it."""
    rows_s: float = 0.0
    """Seconds rank 0 spent preparing the held-out rows while deciding (no phase 1)."""


def decide(args, config: GradPruneConfig, facts: ModelFacts) -> Decision:
    """The decision of rank 0, on every rank; raises GradPruneConfigError on every rank when rank 0's
    decision failed or some rank's settings differ from rank 0's."""
    import torch.distributed as dist

    rank = dist.get_rank() if is_distributed() else 0
    mine = keys.agreement(args, config)
    outcome: Decision | str | None = None
    failure: BaseException | None = None
    if rank == 0:
        try:
            with alone():  # the data may be loaded and encoded here, by rank 0 alone
                # A local folder's identity is already in ``mine`` (its weight files read once); a hub model's
                # is taken here, after rank 0 fetched its weights.
                outcome = _decide(args, config, mine["model"] or keys.model_identity(args.model_dir))
                _check_plan(args, config, facts, outcome)
        except Exception as error:  # every failure reaches every rank as one line
            failure, outcome = error, one_line(error, "deciding what this run does")
    if not is_distributed() or dist.get_world_size() == 1:
        return _result(outcome, failure)
    shared = [outcome, mine]
    dist.broadcast_object_list(shared, src=0)
    outcome, reference = shared
    diff = keys.differences(mine, reference) if rank else []
    views: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(views, diff)
    disagreeing = [(r, d) for r, d in enumerate(views) if d]
    if disagreeing:
        r, diff = disagreeing[0]
        name, theirs, ours = diff[0]
        more = sum(len(d) for _, d in disagreeing) - 1
        raise GradPruneConfigError(
            f"the ranks disagree on what shapes this run, so they would take different paths and wait on each "
            f"other: rank {r} has {name} = {theirs!r} where rank 0 has {ours!r}"
            + (f" ({more} more difference(s))" if more else "")
            + "; give every rank the same arguments, model files and package versions"
        )
    return _result(outcome, failure)


def after_phase1(args, config: GradPruneConfig, decision: Decision) -> Decision:
    """The PHASE1 decision completed once phase 1 saved its state: the prune key (its rows are known now)
    and where the pruned model goes; computed by rank 0, the same on every rank."""

    def complete() -> Decision:
        state = Path(decision.state_dir)
        rows = keys.rows_key(load_batches(state / BATCHES_FILE))
        key = keys.prune_key(decision.material["model"], rows, decision.phase1_key, config, args.model_type)
        return replace(decision, action=PRUNE, prune_key=key, pruned_dir=str(reuse.new_model_dir(args, key)))

    return broadcast_from_rank0(on_rank0(complete, "keying the phase-1 state"))


def _result(outcome: Decision | str | None, failure: BaseException | None = None) -> Decision:
    if failure is not None and os.environ.get("GRADPRUNE_DEBUG"):
        raise failure
    if isinstance(outcome, str):
        raise GradPruneConfigError(outcome) from failure
    assert outcome is not None
    return outcome


def _decide(args, config: GradPruneConfig, identity: dict[str, Any]) -> Decision:
    if args.resume_from_checkpoint:
        source, key = reuse.pruned_model_of_checkpoint(args.resume_from_checkpoint, identity, config, _log_info)
        return _reuse(args, source, key)
    here = Path(args.output_dir) / reuse.GRADPRUNE_DIR
    material = {"model": identity, "swift": keys.swift_settings(args), "versions": keys.versions(), "data": None}
    if config.needs_gradients:
        material["data"] = keys.dataset_digests(args)
        first = keys.phase1_key(args, config, identity, material["data"])
        state = reuse.find_state(args, first, config)
        if state is None:
            _enough_rows_for_auto(args, config)
            return Decision(PHASE1, None, None, first, state_dir=str(here / reuse.STATE_DIR), material=material)
        rows, seconds = keys.rows_key(load_batches(state / BATCHES_FILE)), 0.0
    else:
        _enough_rows_for_auto(args, config)
        first, state, start = None, here / reuse.ROWS_DIR, time.perf_counter()
        try:
            rows = prepare_rows(args, config, material, state)
        except GradPruneConfigError:
            raise
        except Exception as error:
            raise GradPruneConfigError(one_line(error, "reading the training rows")) from error
        seconds = time.perf_counter() - start
    key = keys.prune_key(identity, rows, first, config, args.model_type)
    source = reuse.find_pruned_model(args, key)
    if source is not None:
        return _reuse(args, source, key)
    return Decision(PRUNE, str(reuse.new_model_dir(args, key)), key, first, state_dir=str(state), rows_s=seconds)


def _reuse(args, source: Path, key: str) -> Decision:
    """Reuse ``source``: in place when it is this run's own, else linked into this version folder."""
    here = Path(args.output_dir) / reuse.GRADPRUNE_DIR
    pruned = source if source.parent == here else reuse.new_model_dir(args, key)
    return Decision(REUSE, str(pruned), key, source_dir=str(source))


def _log_info(line: str) -> None:
    from swift.utils import get_logger

    get_logger().info(line)


def _enough_rows_for_auto(args, config: GradPruneConfig) -> None:
    """prune_layers=auto measures on held-out rows: refuse a training set too small to hold them out, before
    any row is encoded or phase 1 runs."""
    if config.prune_layers != "auto":
        return
    rows = training_rows(args)
    if rows is not None and rows < 4 * config.guard_rows:
        raise GradPruneConfigError(
            f"--gradprune_prune_layers auto measures the loss on --gradprune_guard_rows {config.guard_rows} held-out "
            f"rows, which needs a training set of at least {4 * config.guard_rows} rows; it has {rows}: lower "
            "--gradprune_guard_rows or set --gradprune_prune_layers to a number"
        )


def _check_plan(args, config: GradPruneConfig, facts: ModelFacts, decision: Decision) -> None:
    """Rank 0's checks that need the data or a saved state (not the weights): held-out rows in the state for
    prune_layers=auto, a phase-1 step count that fits the run, and whether pruning can pay off."""
    from swift.utils import get_logger

    if decision.action == REUSE:
        return
    auto = config.prune_layers == "auto"
    total = args.max_steps if args.max_steps and args.max_steps > 0 else None
    if total is None:
        rows = training_rows(args)
        total = estimate_total_steps(args, rows) if rows is not None else None
    if auto and decision.action == PRUNE and not load_batches(Path(decision.state_dir) / BATCHES_FILE)["guard"]:
        raise GradPruneConfigError(
            f"--gradprune_prune_layers auto measures the loss on held-out rows and the state "
            f"{decision.state_dir} has none (a streaming dataset); set --gradprune_prune_layers to a number"
        )
    steps = 0
    if decision.action == PHASE1 and total is not None:
        steps = config.phase1_steps(total)
        zero_first = args.init_weights in ZERO_B_INITS  # LoRA B = 0: the first step's simulated gradient is 0
        if zero_first and steps - 1 < FEWEST_STEPS:
            raise GradPruneConfigError(
                f"phase 1 would capture {steps} optimizer steps, and with LoRA's initialisation (B = 0, --init_weights "
                f"{args.init_weights}) the first has no gradient signal: the IGIA scores need at least {FEWEST_STEPS} "
                f"informative steps, so set --gradprune_steps {FEWEST_STEPS + 1} or more ({ADVISED_STEPS}+ advised)"
            )
        if steps < ADVISED_STEPS:
            get_logger().warning(
                f"[GradPruner] WARNING: phase 1 captures only {steps} optimizer steps (step 1's gradients are zero): "
                f"the IGIA ranking rests on very few gradients; {ADVISED_STEPS} or more are advised"
            )
    if total is None:
        return
    per_step = args.per_device_train_batch_size * args.training_args.gradient_accumulation_steps * world_size()
    cost = estimate(total_steps=total, phase1_steps=steps, criterion=config.score, remove=facts.remove,
                    layers=facts.layers, calibration_rows=config.calibration_rows if config.needs_calibration else 0,
                    guard_rows=config.guard_rows, rows_per_step=per_step, kept_fraction=facts.kept_compute)  # fmt: skip
    if not cost.pays_off():
        get_logger().warning(f"[GradPruner] WARNING: {cost.message()}")
