"""The quality guard: is the pruned model still the model it was? (Not part of the paper.)

Before phase 2, the pruned (and merged) model's next-token predictions are compared with the
dense model's on a few held-out rows of the user's own training data that phase 1 never trained
on: the mean KL(dense || pruned) over every real token (damage.py), in nats per token. It is 0 for
an unchanged model and grows with any change, so a pruned model that got less confident cannot
pass for a better one (the answer loss it replaces fell on such models while their accuracy fell;
docs/accuracy.md). Above ``max_kl`` the run warns and names the largest smaller count of removed
layers that stays within it; ``prune_layers="auto"`` chooses that count by itself.

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
from .damage import DenseTargets
from .measures import Batch, mean_kl, mean_loss
from .merge import merge_removed_layers
from .selection import LayerPlan
from .surgery import layers_view


class GuardError(GradPruneConfigError):
    """prune_layers='auto' found no layer count within the threshold."""


def measured_with_plan(
    model: nn.Module,
    plan: LayerPlan,
    igia: Callable[[str], torch.Tensor | None],
    config: GradPruneConfig,
    measure: Callable[[nn.Module], float],
) -> float:
    """``measure(model)`` with ``model`` pruned and merged by ``plan``; ``model`` is left unchanged."""
    layers = decoder_layers(model)
    targets = sorted(set(plan.merged.values()))
    saved = {t: {n: p.detach().clone() for n, p in layers[t].named_parameters()} for t in targets}
    try:
        merge_removed_layers(model, plan, igia, config)
        with layers_view(model, plan.kept):
            return measure(model)
    finally:
        with torch.no_grad():
            for t, params in saved.items():
                for name, value in params.items():
                    layers[t].get_parameter(name).copy_(value)


def kl_with_plan(model, plan, igia, config, batches: Sequence[Batch], dense: Sequence[DenseTargets]) -> float:
    """Mean KL per real token of ``batches`` between ``model`` as it is (``dense``) and pruned by ``plan``."""
    return measured_with_plan(model, plan, igia, config, lambda m: mean_kl(m, batches, dense))


def loss_with_plan(model, plan, igia, config, batches: Sequence[Batch]) -> float:
    """Mean loss on the labelled tokens of ``batches`` of ``model`` pruned and merged by ``plan``."""
    return measured_with_plan(model, plan, igia, config, lambda m: mean_loss(m, batches))


@dataclass
class GuardReport:
    """What the guard measured, for the report."""

    rows: int
    tokens: int
    threshold: float
    """Largest KL (nats per token) that counts as healthy: ``max_kl``."""
    kl: float = 0.0
    """KL of the pruned model's predictions from the dense model's, nats per token."""
    kls: dict[int, float] = field(default_factory=dict)
    """KL of every candidate layer count that was measured."""
    suggestion: int | None = None
    """When over the threshold: the largest smaller count within it (None: not even 1 layer)."""
    dense_loss: float = 0.0
    """Answer loss of the dense model on the held-out rows (for information)."""
    pruned_loss: float = 0.0

    @property
    def ok(self) -> bool:
        return self.kl <= self.threshold

    def to_dict(self) -> dict:
        return {**asdict(self), "kls": {str(k): v for k, v in sorted(self.kls.items())}, "ok": self.ok}

    def message(self, removed: int) -> str:
        text = (
            f"pruned model's predictions on {self.rows} held-out training rows ({self.tokens} tokens) are "
            f"KL {self.kl:.3f} nats/token from the dense model's (threshold {self.threshold:g}; answer loss "
            f"{self.dense_loss:.3f} dense -> {self.pruned_loss:.3f} pruned)"
        )
        if self.ok:
            return text
        if self.suggestion is None:
            return text + "; even 1 removed layer exceeds it: this model/data may not tolerate layer removal"
        return (
            f"{text}; removing {removed} layers damaged the model: {self.suggestion} layers stay within the "
            f"threshold (--gradprune_prune_layers {self.suggestion}, or auto)"
        )


def largest_within(low: int, high: int, value_of: Callable[[int], float], limit: float) -> int | None:
    """The largest n in [low, high] with value_of(n) <= limit, by bisection (the value is taken to grow
    with n); None when even ``low`` exceeds it."""
    if high < low or value_of(low) > limit:
        return None
    while low < high:
        mid = (low + high + 1) // 2
        if value_of(mid) <= limit:
            low = mid
        else:
            high = mid - 1
    return low
