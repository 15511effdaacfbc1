"""GradPruneConfig: every GradPruner option and its default, validated up front. Defaults are the
paper's except where measurement argued otherwise (score, merge_layers: docs/accuracy.md).

Field help texts are the reference documentation: the table in docs/options.md and the CLI help are built from
them, so a default or a range is written down once, here.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

MERGE_MODES = ("add", "average", "fisher")
IGIA_SCORES = ("squared", "norm")
"""Layer scores built from the phase-1 gradients (Eq. 4, or the authors' code)."""
REMOVAL_CRITERIA = ("kl", "skip_loss", "block_influence", "angular", "last")
"""Criteria that measure what removing a layer does on calibration rows (criteria.py)."""
SCORE_KINDS = IGIA_SCORES + REMOVAL_CRITERIA
MIN_STEPS = 10
"""Fewest phase-1 steps chosen from ``step_ratio`` (an explicit ``steps`` may be smaller)."""
FEWEST_STEPS = 2
"""Fewest phase-1 steps at all: step 1's simulated gradient is zero (LoRA B starts at 0)."""
ADVISED_STEPS = 8
"""Below this many phase-1 steps the run warns that the IGIA ranking rests on very few gradients."""
DEFAULT_PRUNE_RATIO = 0.4
PAPER_MERGE_SHARE = 3 / 13
"""The paper merges 3 of the 13 layers it removes from Llama-3.1-8B."""


class GradPruneConfigError(ValueError):
    """A GradPruner option has a value outside its valid range."""


def _help(text: str, default: Any = MISSING, **kw: Any) -> Any:
    kw.setdefault("metadata", {})["help"] = text
    if default is MISSING:
        return field(**kw)
    return field(default=default, **kw)


@dataclass
class GradPruneConfig:
    """Options of a GradPruner run (paper arXiv 2601.19503; section numbers refer to it)."""

    prune_layers: int | str | None = _help(
        "Number N of decoder layers to remove (merged ones included), or 'auto': the largest N (up to "
        "prune_ratio's count) whose pruned model stays within max_kl of the dense model on held-out rows. "
        "Paper: 13 of Llama-3.1-8B's 32 layers.",
        None,
    )
    prune_ratio: float | None = _help(
        "Fraction of the decoder layers to remove: ratio x the number of decoder layers, rounded to the "
        "nearest count (ties: fewer). Where every layer has the same size (dense models) that is the same "
        "fraction of the decoder-layer parameters, as the paper counts its '40%' (13 of Llama-3.1-8B's 32 "
        "layers; 12 of SmolLM2's 30); where sizes differ (MoE models with dense first layers) it counts "
        "layers, not parameters. Used when prune_layers is unset or auto (then as its ceiling); default "
        f"{DEFAULT_PRUNE_RATIO}.",
        None,
    )
    merge_layers: int | None = _help(
        "Number K of the removed layers that are merged (Sec. 3.2) into the preceding retained layer "
        "instead of being dropped: the K highest-IGIA-scoring removed layers that have a retained layer "
        "before them. Default 0 (prune only): on SmolLM2 merging the paper's share (3 of every 13 removed) "
        "cost 9.5 points at 12 of 30 layers and was within noise at 6 (docs/accuracy.md). The paper "
        "merges 3 of 13 (examples/yaml/llama3_1_8b_*.yaml).",
        0,
    )
    topp: float = _help(
        "Fraction of each merged linear's weights kept, ranked by the IGIA matrix F (Sec. 3.2 "
        "sparsification; paper 0.2 = 80% sparsity).",
        0.2,
    )
    merge_mode: str = _help(
        "How kept, same-sign elements are combined with the retained weight: 'add' (Eq. 5, "
        "W_r + W_m), 'average' (App. B.2 weights (0.5, 0.5)), 'fisher' (App. B.2 Fisher-weighted "
        "(F_r W_r + F_m W_m) / (F_r + F_m)).",
        "add",
    )
    score: str = _help(
        "Which layers to remove. 'block_influence' (default) = ShortGPT's Block Influence, 1 - cos(layer "
        "input, output) over the real tokens of calibration rows of your data, one forward pass (not in the "
        "paper; chosen on measured accuracy and cost, docs/accuracy.md); 'squared' = the paper's Eq. 4, the "
        "sum of the IGIA matrix (mean over steps of ‖dB·dA‖_F²), the exact reproduction; 'norm' = mean over "
        "steps of ‖dB·dA‖_F, as in the authors' released code; 'skip_loss' = greedily remove the layer whose "
        "removal raises the answer loss on the calibration rows least; 'kl' = the same greedy search on the "
        "KL of the predictions from the dense model's over all tokens; 'angular' = the contiguous block whose "
        "input and output are closest (Gromov et al.); 'last' = the layers just before the final one. The "
        "merge (Sec. 3.2) always ranks and masks by IGIA.",
        "block_influence",
    )
    calibration_rows: int = _help(
        "Training rows the block_influence, skip_loss, kl and angular criteria run on (forward passes only).",
        16,
    )
    guard_rows: int = _help(
        "Held-out training rows (never trained on in phase 1) on which the pruned model's predictions are "
        "compared with the dense model's before phase 2 (the quality guard; the run warns above max_kl). "
        "0 turns the guard off.",
        32,
    )
    max_kl: float = _help(
        "Largest damage the quality guard accepts: the mean KL divergence (nats per token) of the pruned "
        "model's next-token predictions from the dense model's over every token of the held-out rows; above "
        "it the run warns and names a smaller N that stays within it (and prune_layers=auto stays within "
        "it). Set on val cells against the accuracy lost after fine-tuning (docs/accuracy.md): no model "
        "that lost 2 points or less measured above 0.38, but 2-3 removed layers lost 5-25 points at 0.23-0.46, "
        "so a quiet guard is no proof of a healthy model; `gradprune eval` calibrates it on your tasks.",
        0.5,
    )
    steps: int | None = _help(
        "Phase-1 LoRA optimizer steps t whose gradients are captured (Sec. 3.1); phase 1 runs only when an "
        f"IGIA score or a merge reads them. Default: step_ratio of the run's total optimizer steps T, at least "
        f"{MIN_STEPS}. At least {FEWEST_STEPS}, and {FEWEST_STEPS + 1} with LoRA's default initialisation (B = 0: "
        "the first step has no gradient signal).",
        None,
    )
    step_ratio: float = _help(
        "t as a fraction of the run's total optimizer steps T when steps is unset (paper: ~1% of T, and "
        "as little as 0.08% of T still ranks layers well).",
        0.01,
    )
    lora_rank: int = _help(
        "Phase-1 LoRA rank when the run itself is not LoRA (full fine-tuning); a LoRA run uses its "
        "own --lora_rank. Authors' code: 8.",
        8,
    )
    lora_alpha: int = _help("Phase-1 LoRA alpha when the run itself is not LoRA. Authors' code: 32.", 32)
    benchmark: bool = _help(
        "Time inference of the dense and the pruned model side by side after pruning (greedy decode of "
        "32 tokens, prefill of 128, 5 alternating rounds, on the GPU when there is one; `gradprune bench` "
        "measures more) and put the ratios in the report. Not part of the paper; turn off for a model too "
        "slow to run on CPU.",
        True,
    )
    keep_state: bool = _help(
        "Keep phase 1's per-step LoRA gradient factors after pruning (in <output_dir>/gradprune/state), so "
        "that a later run or `gradprune prune` can merge with other options without phase 1. They are "
        "written only when a merge reads them (about 80 MiB per step for an 8B model at r=8) and deleted "
        "after pruning unless this is true.",
        False,
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise GradPruneConfigError naming the first bad value and its valid range."""
        auto = self.prune_layers == "auto"
        if self.prune_layers is not None and self.prune_ratio is not None and not auto:
            _fail("prune_layers", self.prune_layers, "set either prune_layers or prune_ratio, not both")
        if self.prune_layers is not None and not auto and (not _is_int(self.prune_layers) or self.prune_layers < 1):
            _fail("prune_layers", self.prune_layers, "must be an integer >= 1 or auto")
        if auto and self.guard_rows < 1:
            _fail("guard_rows", self.guard_rows, "must be >= 1 with prune_layers=auto (it measures on them)")
        if not (_is_real(self.max_kl) and self.max_kl >= 0):
            _fail("max_kl", self.max_kl, "must be a number >= 0 (nats per token), e.g. 0.1")
        if self.prune_ratio is not None and not (_is_real(self.prune_ratio) and 0 < self.prune_ratio < 1):
            _fail("prune_ratio", self.prune_ratio, "must be in (0, 1), e.g. 0.4")
        if self.merge_layers is not None and (not _is_int(self.merge_layers) or self.merge_layers < 0):
            _fail("merge_layers", self.merge_layers, "must be an integer >= 0")
        if _is_int(self.prune_layers) and self.merge_layers is not None and self.merge_layers > self.prune_layers:
            _fail(
                "merge_layers",
                self.merge_layers,
                f"must be <= prune_layers ({self.prune_layers}): merged layers are among the removed ones",
            )
        if not (_is_real(self.topp) and 0 < self.topp <= 1):
            _fail("topp", self.topp, "must be in (0, 1], e.g. 0.2")
        if self.merge_mode not in MERGE_MODES:
            _fail("merge_mode", self.merge_mode, f"must be one of {', '.join(MERGE_MODES)}")
        if self.score not in SCORE_KINDS:
            _fail("score", self.score, f"must be one of {', '.join(SCORE_KINDS)}")
        if self.steps is not None and (not _is_int(self.steps) or self.steps < FEWEST_STEPS):
            why = f"step 1's LoRA gradients are zero as LoRA B starts at 0; {ADVISED_STEPS}+ rank more reliably"
            _fail("steps", self.steps, f"must be an integer >= {FEWEST_STEPS} ({why})")
        if not (_is_real(self.step_ratio) and 0 < self.step_ratio < 1):
            _fail("step_ratio", self.step_ratio, "must be in (0, 1), e.g. 0.01")
        for name in ("benchmark", "keep_state"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be true or false")
        if not _is_int(self.guard_rows) or self.guard_rows < 0:
            _fail("guard_rows", self.guard_rows, "must be an integer >= 0")
        for name in ("lora_rank", "lora_alpha", "calibration_rows"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                _fail(name, value, "must be an integer >= 1")

    def merge_count(self, removed: int) -> int:
        """K for ``removed`` layers: merge_layers, or the paper's 3-of-13 share when it is None."""
        if self.merge_layers is not None:
            return min(self.merge_layers, removed)
        return round(PAPER_MERGE_SHARE * removed)

    @property
    def needs_gradients(self) -> bool:
        """Whether anything reads phase 1's LoRA gradients: an IGIA score, or a merge (ranked and
        masked by IGIA; merge_layers None is the paper's share). Without it phase 1 is skipped."""
        return self.score in IGIA_SCORES or self.merge_layers != 0

    @property
    def needs_factors(self) -> bool:
        """Whether the per-step gradient factors are read (to rebuild F for a merge) or kept."""
        return self.merge_layers != 0 or self.keep_state

    @property
    def needs_calibration(self) -> bool:
        """Whether the layer choice runs the model on calibration rows (not only the gradients)."""
        return self.score in ("kl", "skip_loss", "block_influence", "angular")

    def phase1_steps(self, total_steps: int) -> int:
        """Number t of phase-1 steps for a run of ``total_steps`` optimizer steps T (t < T)."""
        if total_steps < 2:
            raise GradPruneConfigError(
                f"the run has {total_steps} optimizer step(s); GradPruner needs at least 2 "
                "(phase 1 then phase 2): raise --max_steps or --num_train_epochs"
            )
        if self.steps is not None:
            if self.steps >= total_steps:
                _fail(
                    "steps",
                    self.steps,
                    f"must be < the run's {total_steps} optimizer steps; lower it or lengthen the run",
                )
            return self.steps
        steps = min(max(math.ceil(self.step_ratio * total_steps), MIN_STEPS), total_steps - 1)
        if steps < FEWEST_STEPS:
            raise GradPruneConfigError(
                f"the run has {total_steps} optimizer steps; phase 1 needs at least {FEWEST_STEPS} of them (step 1's "
                "LoRA gradients are zero) and phase 2 at least 1: raise --max_steps or --num_train_epochs"
            )
        return steps

    def unused_options(self) -> list[str]:
        """One line per option that was set and does nothing in this configuration: the phase-1 options
        when nothing reads phase 1's gradients (so phase 1 does not run)."""
        if self.needs_gradients:
            return []
        defaults = {f.name: f.default for f in fields(self)}
        set_here = [name for name in ("steps", "step_ratio", "lora_rank", "lora_alpha", "keep_state")
                    if getattr(self, name) != defaults[name]]  # fmt: skip
        return [
            f"--gradprune_{name} {str(getattr(self, name)).lower()} does nothing in this run: it shapes phase 1 "
            f"(the LoRA probe whose gradients an IGIA score or a merge reads), and with --gradprune_score {self.score} "
            "and no merged layer there is no phase 1; use --gradprune_score squared or --gradprune_merge_layers N "
            "to run it, or drop the flag"
            for name in set_here
        ]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GradPruneConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise GradPruneConfigError(
                f"unknown GradPruner option(s) {unknown}; valid options: {', '.join(sorted(known))}"
            )
        return cls(**values)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fail(name: str, value: Any, rule: str) -> None:
    raise GradPruneConfigError(f"gradprune {name}={value!r} is invalid: {rule}")
