"""What this run does before phase 2, decided once, by rank 0, for every rank.

Reusing a pruned model, pruning from a saved state, preparing the held-out rows without phase 1, or
running phase 1: each sends the ranks into different collectives, so ranks that decided on their own
(their own version tags, dataset digests, view of the file system) could hang. Rank 0 computes the
keys (it alone hashes the dataset files), decides, and broadcasts the decision with what its keys are
made of; every rank checks that its own settings, model files and package versions are the same and,
if any rank differs, every rank stops with one line naming the rank and the setting.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ADVISED_STEPS, FEWEST_STEPS, GradPruneConfig, GradPruneConfigError
from ..payoff import estimate
from . import keys, reuse
from .distributed import alone, is_distributed, one_line
from .holdout import BATCHES_FILE, load_batches
from .preflight import ModelFacts, estimate_total_steps, training_rows, world_size

REUSE, PRUNE, PHASE1, DATA = "reuse", "prune", "phase1", "data"
"""Reuse a pruned model; prune from a saved state; run phase 1; prepare the rows without phase 1."""
ZERO_B_INITS = (True, "true", "True", "gaussian")
"""peft LoRA initialisations that start B at 0 (swift's default is True): step 1's gradient is zero."""


@dataclass(frozen=True)
class Decision:
    action: str
    phase1_key: str
    prune_key: str
    pruned_dir: str
    """Where phase 2's base model is (or will be) in this run's version folder."""
    source_dir: str | None = None
    """REUSE: the earlier model, linked into ``pruned_dir`` when it lives elsewhere."""
    state_dir: str | None = None
    """PRUNE: the saved state to prune from; PHASE1 / DATA: where the new state goes."""
    material: dict[str, Any] = field(default_factory=dict)
    """What the phase-1 key hashed on rank 0 (``keys.key_material``), for the new state's phase1.json."""


def decide(args, config: GradPruneConfig, facts: ModelFacts) -> Decision:
    """The decision of rank 0, on every rank; raises GradPruneConfigError on every rank when rank 0's
    decision failed or some rank's settings differ from rank 0's."""
    import torch.distributed as dist

    rank = dist.get_rank() if is_distributed() else 0
    material = keys.key_material(args, config, data=False)
    outcome: Decision | str | None = None
    failure: BaseException | None = None
    if rank == 0:
        try:
            material["data"] = keys.dataset_digests(args)
            with alone():  # the data may be loaded here, by rank 0 alone
                outcome = _decide(args, config, material)
                _check_plan(args, config, facts, outcome)
        except Exception as error:  # every failure reaches every rank as one line
            failure, outcome = error, one_line(error, "deciding what this run does")
    if not is_distributed() or dist.get_world_size() == 1:
        return _result(outcome, failure)
    shared = [outcome, {k: v for k, v in material.items() if k != "data"}]
    dist.broadcast_object_list(shared, src=0)
    outcome, reference = shared
    mine = keys.differences(material, reference) if rank else []
    views: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(views, mine)
    disagreeing = [(r, diff) for r, diff in enumerate(views) if diff]
    if disagreeing:
        r, diff = disagreeing[0]
        name, theirs, ours = diff[0]
        more = sum(len(d) for _, d in disagreeing) - 1
        raise GradPruneConfigError(
            f"the ranks disagree on what shapes phase 1, so they would take different paths and wait on each "
            f"other: rank {r} has {name} = {theirs!r} where rank 0 has {ours!r}"
            + (f" ({more} more difference(s))" if more else "")
            + "; give every rank the same arguments, model files and package versions"
        )
    return _result(outcome, failure)


def _result(outcome: Decision | str | None, failure: BaseException | None = None) -> Decision:
    if failure is not None and os.environ.get("GRADPRUNE_DEBUG"):
        raise failure
    if isinstance(outcome, str):
        raise GradPruneConfigError(outcome) from failure
    assert outcome is not None
    return outcome


def _decide(args, config: GradPruneConfig, material: dict[str, Any]) -> Decision:
    first = keys.phase1_key(material)
    key = keys.prune_key(first, config)
    here = Path(args.output_dir) / reuse.GRADPRUNE_DIR
    if args.resume_from_checkpoint:
        source = reuse.pruned_model_of_checkpoint(args.resume_from_checkpoint, key, material, config, _log_info)
    else:
        source = reuse.find_pruned_model(args, key)
    if source is not None:
        pruned = source if source.parent == here else reuse.new_model_dir(args, key)
        return Decision(REUSE, first, key, str(pruned), source_dir=str(source))
    pruned = reuse.new_model_dir(args, key)
    state = reuse.find_state(args, first, config)
    if state is not None:
        return Decision(PRUNE, first, key, str(pruned), state_dir=str(state))
    action = PHASE1 if config.needs_gradients else DATA
    return Decision(action, first, key, str(pruned), state_dir=str(here / reuse.STATE_DIR), material=material)


def _log_info(line: str) -> None:
    from swift.utils import get_logger

    get_logger().info(line)


def _check_plan(args, config: GradPruneConfig, facts: ModelFacts, decision: Decision) -> None:
    """Rank 0's checks that need the data or a saved state (not the weights): enough rows for
    prune_layers=auto, a phase-1 step count that fits the run, and whether pruning can pay off."""
    from swift.utils import get_logger

    if decision.action == REUSE:
        return
    auto = config.prune_layers == "auto"
    total = args.max_steps if args.max_steps and args.max_steps > 0 else None
    rows = training_rows(args) if total is None or (auto and decision.action != PRUNE) else None
    if total is None and rows is not None:
        total = estimate_total_steps(args, rows)
    if auto and decision.action == PRUNE and not load_batches(Path(decision.state_dir) / BATCHES_FILE)["guard"]:
        raise GradPruneConfigError(
            f"--gradprune_prune_layers auto measures the loss on held-out rows and the saved state "
            f"{decision.state_dir} has none; set --gradprune_prune_layers to a number"
        )
    if auto and rows is not None and rows < 4 * config.guard_rows:
        raise GradPruneConfigError(
            f"--gradprune_prune_layers auto measures the loss on --gradprune_guard_rows {config.guard_rows} held-out "
            f"rows, which needs a training set of at least {4 * config.guard_rows} rows; it has {rows}: lower "
            "--gradprune_guard_rows or set --gradprune_prune_layers to a number"
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
