"""Does pruning pay off for this run? Fixed costs against what the smaller model saves (pure arithmetic).

A GradPruner run costs, besides phase 2 itself: phase 1 (t LoRA steps of the dense model, only when
an IGIA score or a merge reads its gradients), the criterion's forward passes on the calibration rows,
the quality guard's, the dense-vs-pruned timing, loading and saving the model, and one more swift
start-up. Phase 2 saves (1 - r) of each optimizer step, r = pruned / dense step time.

Before the run, ``estimate`` expresses the fixed costs in dense optimizer steps (a forward pass of a
row costs about a third of training on it) and r by the fraction of compute the pruned model keeps, so
the run can warn when it is too short to pay off. After the run, ``whole_run`` compares the measured
wall time with an estimate of the dense run: phase 2's wall time with its training time divided by r.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

GREEDY_CRITERIA = ("skip_loss", "kl")
"""Criteria that try every remaining layer in each of N rounds: about N * L / 2 forward passes."""
ONE_PASS_CRITERIA = ("block_influence", "angular")
"""Criteria that measure every layer in one forward pass over the calibration rows."""
FREE_CRITERIA = ("last", "squared", "norm")
"""Criteria that run no forward pass (the IGIA scores come from phase 1's gradients)."""
FORWARD_SHARE = 1 / 3
"""A forward pass of a row costs about a third of a training step's forward and backward on it."""


@dataclass(frozen=True)
class Estimate:
    """Fixed costs and savings of a planned run, in dense optimizer steps."""

    total_steps: int
    phase1_steps: int
    criterion_steps: float
    guard_steps: float
    kept_fraction: float
    """Compute the pruned model keeps per step (r), from its share of the decoder-layer parameters."""

    @property
    def fixed_steps(self) -> float:
        return self.phase1_steps + self.criterion_steps + self.guard_steps

    @property
    def saved_steps(self) -> float:
        return self.total_steps * (1 - self.kept_fraction)

    @property
    def break_even_steps(self) -> int:
        """The run length from which phase 2's savings exceed the fixed costs."""
        return math.ceil(self.fixed_steps / max(1 - self.kept_fraction, 1e-9))

    def pays_off(self) -> bool:
        return self.saved_steps > self.fixed_steps

    def message(self) -> str:
        parts = [f"{self.phase1_steps} phase-1 steps" if self.phase1_steps else "",
                 f"{self.criterion_steps:.1f} for the criterion's forward passes" if self.criterion_steps else "",
                 f"{self.guard_steps:.1f} for the quality guard's" if self.guard_steps else ""]  # fmt: skip
        return (
            f"this run is probably too short for pruning to pay off: over its {self.total_steps} optimizer steps the "
            f"pruned model saves about {self.saved_steps:.1f} dense-step equivalents ({1 - self.kept_fraction:.0%} "
            f"of each), while pruning costs about {self.fixed_steps:.1f} ({', '.join(p for p in parts if p)}) plus "
            f"a second model load and swift start-up; it pays off from about {self.break_even_steps} steps"
        )


def criterion_passes(criterion: str, remove: int, layers: int) -> float:
    """Full-model forward passes over the calibration rows that ``criterion`` needs to remove ``remove``
    of ``layers`` layers (a greedy round tries each remaining layer, on average half the model)."""
    if criterion in FREE_CRITERIA:
        return 0.0
    if criterion in ONE_PASS_CRITERIA:
        return 1.0
    # Greedy (skip_loss, kl and any criterion not listed: the conservative guess): each round runs the
    # model once to cache every layer's input, then each remaining layer's tail (half the model on average).
    return sum(1 + (layers - k) / 2 for k in range(remove))


def estimate(*, total_steps: int, phase1_steps: int, criterion: str, remove: int, layers: int,
             calibration_rows: int, guard_rows: int, rows_per_step: int, kept_fraction: float) -> Estimate:  # fmt: skip
    """The fixed costs and savings of a run of ``total_steps`` optimizer steps of ``rows_per_step``
    rows (batch x accumulation x ranks) that removes ``remove`` of ``layers`` layers."""
    per_row = FORWARD_SHARE / max(rows_per_step, 1)
    criterion_steps = criterion_passes(criterion, remove, layers) * calibration_rows * per_row
    guard_passes = 2 + math.ceil(math.log2(max(remove, 1)) + 1) if guard_rows else 0  # dense, N, bisection
    return Estimate(total_steps=total_steps, phase1_steps=phase1_steps, criterion_steps=criterion_steps,
                    guard_steps=guard_passes * guard_rows * per_row, kept_fraction=kept_fraction)  # fmt: skip


@dataclass
class WholeRun:
    """The measured whole run against an estimate of the dense run (seconds)."""

    total_s: float
    """From the process start (imports included) to the end of phase 2."""
    startup_s: float
    """The process start-up before GradPruner's first step: a dense run pays it too."""
    stages_s: dict[str, float]
    """Fixed costs by stage (preflight, phase 1 or data, choice, surgery, timing, load/save, ...)."""
    phase2_s: float
    """Phase 2's wall time (start-up, data, training, saving)."""
    phase2_train_s: float
    step_ratio: float
    """Pruned / dense time per training step: measured (prefill timing) or the FLOP fraction."""
    ratio_source: str

    @property
    def dense_estimate_s(self) -> float:
        """A dense run of the same settings: phase 2 with its training time divided by the step ratio."""
        return self.startup_s + self.phase2_s + self.phase2_train_s * (1 / self.step_ratio - 1)

    @property
    def ratio(self) -> float:
        """Whole GradPruner run / estimated dense run (< 1: pruning saved time)."""
        return self.total_s / self.dense_estimate_s if self.dense_estimate_s > 0 else float("inf")

    def to_dict(self) -> dict:
        return {**asdict(self), "dense_estimate_s": self.dense_estimate_s, "ratio": self.ratio}

    def line(self) -> str:
        fixed = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in self.stages_s.items() if seconds >= 0.5)
        verdict = "faster than" if self.ratio < 1 else "slower than"
        return (
            f"whole run {self.total_s:.0f} s = {self.ratio:.2f} x an estimated dense run of "
            f"{self.dense_estimate_s:.0f} s "
            f"({verdict} not pruning); fixed costs: {fixed or 'none'}; phase 2 {self.phase2_s:.0f} s, of which "
            f"training {self.phase2_train_s:.0f} s at {self.step_ratio:.2f} x the dense step time ({self.ratio_source})"
        )
