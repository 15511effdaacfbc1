"""The quality guard: is the pruned model still a working model? (Not part of the paper.)

Before phase 2, the loss of the dense and of the pruned (and merged) model is measured on a few
held-out rows of the user's own training data that phase 1 never trained on (forward passes
only). A relative increase above ``max_loss_increase`` means the pruned model has lost what the
fine-tune is meant to build on: the run warns and says which smaller number of removed layers
stays within the threshold. ``prune_layers="auto"`` uses the same measurement to choose the
largest such number by itself.

Candidate plans are measured without copying the model: the merge is applied to the few target
linears and undone afterwards, and removal is a view of the layer list (surgery.layers_view).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .architecture import decoder_layers
from .config import GradPruneConfig, GradPruneConfigError
from .criteria import Batch, mean_loss
from .merge import merge_removed_layers
from .selection import LayerPlan
from .surgery import layers_view


class GuardError(GradPruneConfigError):
    """prune_layers='auto' found no layer count within the loss threshold."""


def loss_with_plan(
    model: nn.Module,
    plan: LayerPlan,
    igia: Callable[[str], torch.Tensor | None],
    config: GradPruneConfig,
    batches: Sequence[Batch],
) -> float:
    """Mean loss of ``model`` pruned and merged by ``plan`` on ``batches``; ``model`` is left unchanged."""
    layers = decoder_layers(model)
    targets = sorted(set(plan.merged.values()))
    saved = {t: {n: p.detach().clone() for n, p in layers[t].named_parameters()} for t in targets}
    try:
        merge_removed_layers(model, plan, igia, config)
        with layers_view(model, plan.kept):
            return mean_loss(model, batches)
    finally:
        with torch.no_grad():
            for t, params in saved.items():
                for name, value in params.items():
                    layers[t].get_parameter(name).copy_(value)


@dataclass
class GuardReport:
    """What the guard measured, for the report."""

    rows: int
    dense_loss: float
    pruned_loss: float
    threshold: float
    """Largest relative loss increase (pruned / dense - 1) that counts as healthy."""
    losses: dict[int, float] = field(default_factory=dict)
    """Loss of every candidate layer count that was measured."""
    suggestion: int | None = None
    """When over the threshold: the largest smaller count within it (None: not even 1 layer)."""

    @property
    def increase(self) -> float:
        return self.pruned_loss / self.dense_loss - 1 if self.dense_loss > 0 else float("inf")

    @property
    def ok(self) -> bool:
        return self.increase <= self.threshold

    def to_dict(self) -> dict:
        return {**asdict(self), "losses": {str(k): v for k, v in sorted(self.losses.items())},
                "increase": self.increase, "ok": self.ok}  # fmt: skip

    def message(self, removed: int) -> str:
        text = (
            f"pruned-model loss on {self.rows} held-out training rows {self.pruned_loss:.3f} vs dense "
            f"{self.dense_loss:.3f} ({self.increase:+.0%}, threshold +{self.threshold:.0%})"
        )
        if self.ok:
            return text
        if self.suggestion is None:
            return text + "; even 1 removed layer exceeds it: this model/data may not tolerate layer removal"
        return (
            f"{text}; removing {removed} layers damaged the model: {self.suggestion} layers stay within the "
            f"threshold (--gradprune_prune_layers {self.suggestion}, or auto)"
        )


def largest_within(low: int, high: int, loss_of: Callable[[int], float], limit: float) -> int | None:
    """The largest n in [low, high] with loss_of(n) <= limit, by bisection (the loss is taken to grow
    with n); None when even ``low`` exceeds it."""
    if high < low or loss_of(low) > limit:
        return None
    while low < high:
        mid = (low + high + 1) // 2
        if loss_of(mid) <= limit:
            low = mid
        else:
            high = mid - 1
    return low
