"""Sparsify removed-layer weights by IGIA and merge their same-sign elements (Sec. 3.2, Eq. 5, App. B.2).

For one linear: W_r is the weight of the retained layer, W_m (with IGIA matrix F_m) that of a
removed layer merged into it. W_m keeps only its top-p elements by F_m (the rest are zeroed:
W^_m), and an element of W^_m takes part only where its sign equals the sign of W_r. Where it takes
part:

* ``add`` (Eq. 5):        W_r + W^_m
* ``average`` (App. B.2): (W_r + W^_m) / 2, the (0.5, 0.5) weights
* ``fisher`` (App. B.2):  (F_r W_r + F_m W^_m) / (F_r + F_m)

and W_r elsewhere. W_r itself is never sparsified, and its original sign decides for every source.
With several removed layers merging into one retained layer, each contributes its own same-sign
elements: ``add`` sums them, ``average`` and ``fisher`` weight every participating element equally
(lambda = 1/(1 + number of participants)), which reduces to B.2's two-layer formulas.

Only linears that correspond are merged: the same ``nn.Linear`` (by name in the layer) with the same shape
in both layers, with a captured IGIA matrix. In a mixture-of-experts model that is attention, shared
experts and the MLP of dense layers; routed experts (fused 3-d parameters: expert e of one layer has no
counterpart in another layer, whose router sends it other tokens) and routers are never merged, nor is a
dense layer's MLP into an MoE layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .architecture import LAYERS_PREFIX, decoder_layers, layers_prefix, linears
from .config import MERGE_MODES, GradPruneConfig
from .selection import LayerPlan


def topp_mask(importance: torch.Tensor, topp: float) -> torch.Tensor:
    """Mask of the ceil(topp * numel) elements with the largest importance F.

    Elements tied with the smallest kept value are kept too; elements with F = 0 carry no gradient
    signal and are never kept.
    """
    count = importance.numel()
    keep = math.ceil(topp * count)
    if keep >= count:
        return importance > 0
    threshold = torch.kthvalue(importance.flatten(), count - keep + 1).values
    return (importance >= threshold) & (importance > 0)


def merge_linear(
    retained: torch.Tensor,
    sources: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    topp: float,
    mode: str = "add",
    retained_importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Merge removed-layer weights into a retained weight.

    ``sources`` yields (W_m, F_m) pairs of the same shape as ``retained``; each is folded in and let
    go before the next is taken, so a generator keeps one source's F in memory at a time. With no
    source, ``retained`` is returned as is.
    ``retained_importance`` (F_r) is needed by ``fisher`` only. Returns the merged weight, in the
    dtype of ``retained``, and for each source the fraction of its elements that were merged.
    """
    if mode not in MERGE_MODES:
        raise ValueError(f"merge_mode={mode!r} is invalid: must be one of {', '.join(MERGE_MODES)}")
    if mode == "fisher" and retained_importance is None:
        raise ValueError("merge_mode='fisher' needs the retained layer's IGIA matrix (retained_importance)")
    compute = torch.float64 if mode == "fisher" else torch.float32
    fractions: list[float] = []
    for source, importance in sources:
        if source.shape != retained.shape or importance.shape != retained.shape:
            raise ValueError(
                f"merge shapes differ: retained {tuple(retained.shape)}, removed {tuple(source.shape)}, "
                f"importance {tuple(importance.shape)}"
            )
        if not fractions:  # the first source: start from W_r (nothing is computed if no source comes)
            base = retained.detach().to(compute, copy=True)  # becomes the sum itself in add mode
            sign = torch.sign(base).to(torch.int8)  # W_r's sign decides for every source
            if mode == "add":
                numerator = base
            else:
                own = retained_importance.to(base.device, compute) if mode == "fisher" else torch.ones_like(base)
                numerator, denominator = own * base, own.clone()
                del own
        value = source.detach().to(device=base.device, dtype=compute)
        importance = importance.to(base.device)
        take = topp_mask(importance, topp) & (torch.sign(value) == sign)
        fractions.append(take.sum().item() / take.numel())
        if mode == "add":
            numerator += torch.where(take, value, 0.0)
        else:
            weight = importance.to(compute) if mode == "fisher" else 1.0
            numerator += torch.where(take, weight * value, 0.0)
            denominator += torch.where(take, weight, 0.0)
            del weight
        del source, importance, value, take
    if not fractions:
        return retained, fractions
    if mode == "add":
        return numerator.to(retained.dtype), fractions
    # Where nothing was merged and (fisher) F_r is zero, the weights are all zero: keep W_r.
    merged = torch.where(denominator > 0, numerator / denominator, base)
    return merged.to(retained.dtype), fractions


def merge_into(
    target: int,
    weights: Mapping[str, torch.Tensor],
    sources: Sequence[int],
    source_weight: Callable[[int, str], torch.Tensor | None],
    igia: Callable[[str], torch.Tensor | None],
    config: GradPruneConfig,
    prefix: str = LAYERS_PREFIX,
) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, float]]]:
    """Eq. 5 for one retained layer ``target``: its linear ``weights`` (by name in the layer, e.g.
    ``mlp.up_proj``) merged with those of the removed layers ``sources`` (``source_weight(j, name)``, None
    where layer j has no such linear). ``prefix`` + layer + name is a linear's name for ``igia``. A source
    linear of another shape (it does not correspond) is not merged.

    Returns the merged weights (only linears something was merged into) and, per source, the
    fraction of each linear's elements merged. Shared by the in-memory and the streaming surgery.
    """
    merged_weights: dict[str, torch.Tensor] = {}
    fractions: dict[int, dict[str, float]] = {source: {} for source in sources}
    for suffix, weight in weights.items():
        own = igia(f"{prefix}{target}.{suffix}") if config.merge_mode == "fisher" else None
        if config.merge_mode == "fisher" and own is None:
            continue
        merged_from: list[int] = []

        def pairs(suffix: str = suffix, merged_from: list[int] = merged_from, weight: torch.Tensor = weight):
            """One source's (W_m, F_m) at a time: F is built when asked for and dropped once merged."""
            for source in sources:
                importance = igia(f"{prefix}{source}.{suffix}")
                value = source_weight(source, suffix) if importance is not None else None
                if value is not None and value.shape == weight.shape:
                    merged_from.append(source)
                    yield value, importance
                del importance, value

        merged, shares = merge_linear(weight, pairs(), topp=config.topp, mode=config.merge_mode,
                                      retained_importance=own)  # fmt: skip
        del own
        if not merged_from:
            continue
        merged_weights[suffix] = merged
        for source, share in zip(merged_from, shares):
            fractions[source][suffix] = share
    return merged_weights, fractions


def merge_removed_layers(
    model: nn.Module,
    plan: LayerPlan,
    igia: Callable[[str], torch.Tensor | None],
    config: GradPruneConfig,
) -> dict[int, dict[str, float]]:
    """Merge each layer of ``plan.merged`` into its retained layer, linear by linear (Eq. 5).

    ``igia(name)`` returns the IGIA matrix F of the linear ``name`` (e.g.
    ``model.layers.3.mlp.up_proj``), or None where no LoRA gradient was captured; such linears are
    not merged. Returns, per merged layer, the fraction of each linear's elements that were merged.
    """
    layers = decoder_layers(model)
    prefix = layers_prefix(model)
    fractions: dict[int, dict[str, float]] = {}

    def source_weight(j: int, suffix: str) -> torch.Tensor | None:
        linear = linears(layers[j]).get(suffix)
        return None if linear is None else linear.weight

    for target, sources in sorted(merge_targets(plan).items()):
        modules = linears(layers[target])
        weights = {suffix: linear.weight for suffix, linear in modules.items()}
        merged, shares = merge_into(target, weights, sources, source_weight, igia, config, prefix)
        with torch.no_grad():
            for suffix, weight in merged.items():
                modules[suffix].weight.copy_(weight)
        fractions.update(shares)
    return {source: fractions[source] for source in plan.merged}


def merge_priority(model: nn.Module, linear_scores: Mapping[str, float], removed: Sequence[int]) -> list[float]:
    """Per layer, the IGIA sum (Eq. 4) over the linears it would merge into the retained layer before it:
    those it shares with that layer (same name and shape) that carry LoRA. For a dense model with LoRA on
    every linear this is the layer score; for an MoE layer it leaves out what is never merged (routed
    experts), so the K merged layers are ranked on what moves. 0 for layers with nothing to merge into."""
    layers = decoder_layers(model)
    prefix = layers_prefix(model)
    gone = set(removed)
    priority = [0.0] * len(layers)
    for j in gone:
        target = max((k for k in range(j) if k not in gone), default=None)
        if target is None:
            continue
        theirs = {name: tuple(m.weight.shape) for name, m in linears(layers[target]).items()}
        for name, module in linears(layers[j]).items():
            if theirs.get(name) == tuple(module.weight.shape):
                priority[j] += linear_scores.get(f"{prefix}{j}.{name}", 0.0)
    return priority


def merge_targets(plan: LayerPlan) -> dict[int, list[int]]:
    """Each retained layer that receives merges, with the removed layers merged into it."""
    targets: dict[int, list[int]] = {}
    for source, target in plan.merged.items():
        targets.setdefault(target, []).append(source)
    return targets
