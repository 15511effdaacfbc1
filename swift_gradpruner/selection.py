"""Which decoder layers to remove and which of those to merge, from the layer scores (Sec. 3.1-3.2)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .config import DEFAULT_PRUNE_RATIO, GradPruneConfig, GradPruneConfigError


@dataclass(frozen=True)
class LayerPlan:
    """The decoder layers a GradPruner run removes.

    ``merged`` maps each merged layer to the retained layer it is merged into (the nearest retained
    layer before it); ``dropped`` layers are removed outright.
    """

    num_layers: int
    dropped: tuple[int, ...]
    merged: Mapping[int, int] = field(default_factory=dict)

    @property
    def removed(self) -> tuple[int, ...]:
        return tuple(sorted((*self.dropped, *self.merged)))

    @property
    def kept(self) -> tuple[int, ...]:
        removed = set(self.removed)
        return tuple(j for j in range(self.num_layers) if j not in removed)


def layers_to_remove(config: GradPruneConfig, num_layers: int) -> int:
    """Number N of layers to remove, from ``prune_layers`` or ``prune_ratio`` (checked against the model).

    With a ratio, N = ratio x num_layers rounded to the nearest count (ties: fewer layers): for layers of
    one size the same share of the decoder-layer parameters, as the paper counts its 40% (13 of
    Llama-3.1-8B's 32 layers); a model with layers of different sizes (MoE with dense first layers) has
    its layers counted, not its parameters.
    Raises GradPruneConfigError before any expensive work when N or merge_layers cannot fit.
    """
    if config.prune_layers is not None:
        count = config.prune_layers
        if count >= num_layers:
            raise GradPruneConfigError(
                f"gradprune prune_layers={count} is invalid: the model has {num_layers} decoder layers, "
                f"so it must be between 1 and {num_layers - 1}"
            )
    else:
        ratio = config.prune_ratio if config.prune_ratio is not None else DEFAULT_PRUNE_RATIO
        exact = ratio * num_layers
        count = math.floor(exact) if exact - math.floor(exact) <= 0.5 else math.ceil(exact)
        if count < 1:
            raise GradPruneConfigError(
                f"gradprune prune_ratio={ratio} is invalid for this model: one of its {num_layers} decoder layers "
                f"is {1 / num_layers:.1%} of them, so the ratio removes no layer; "
                "raise prune_ratio or set prune_layers"
            )
        if count >= num_layers:
            raise GradPruneConfigError(
                f"gradprune prune_ratio={ratio} is invalid for this model: it would remove {count} of "
                f"its {num_layers} decoder layers; lower prune_ratio or set prune_layers"
            )
    if config.merge_layers is not None and config.merge_layers > count:
        raise GradPruneConfigError(
            f"gradprune merge_layers={config.merge_layers} is invalid: only {count} layers are removed "
            f"(merged layers are among them), so it must be between 0 and {count}"
        )
    return count


def plan_layers(scores: Sequence[float], remove: int, merge: int) -> LayerPlan:
    """Remove the ``remove`` lowest-scoring layers; merge the ``merge`` highest-scoring of them.

    Ties in score remove the deeper layer first. See ``plan_removal`` for which removed layers merge.
    """
    num_layers = len(scores)
    _check_finite(scores)
    if not 0 <= remove < num_layers:
        raise ValueError(f"cannot remove {remove} of {num_layers} layers")
    order = sorted(range(num_layers), key=lambda j: (scores[j], -j))
    return plan_removal(num_layers, order[:remove], merge, scores)


def plan_removal(num_layers: int, removed: Sequence[int], merge: int, priority: Sequence[float]) -> LayerPlan:
    """The plan that removes ``removed`` and merges the ``merge`` of them with the highest ``priority``.

    A removed layer with no retained layer before it (layer 0, or a removed block at the start)
    has nothing to merge into, so it is dropped; the merged layers are the highest-priority removed
    layers that do have one (ties: shallower first). Each merges into the nearest retained layer
    before it, so several may share one target.
    """
    _check_finite(priority)
    gone = set(removed)
    if len(gone) != len(removed) or not gone <= set(range(num_layers)) or len(gone) >= num_layers:
        raise ValueError(f"cannot remove layers {sorted(removed)} of {num_layers}")
    if not 0 <= merge <= len(gone):
        raise ValueError(f"cannot merge {merge} of {len(gone)} removed layers")
    kept = [j for j in range(num_layers) if j not in gone]
    target = {j: max((k for k in kept if k < j), default=None) for j in gone}
    candidates = sorted((j for j in gone if target[j] is not None), key=lambda j: (-priority[j], j))
    merged = {j: target[j] for j in sorted(candidates[:merge])}
    dropped = tuple(sorted(gone - set(merged)))
    return LayerPlan(num_layers=num_layers, dropped=dropped, merged=merged)


def _check_finite(scores: Sequence[float]) -> None:
    if any(not math.isfinite(s) for s in scores):
        raise ValueError(f"layer scores must be finite, got {list(scores)}")
