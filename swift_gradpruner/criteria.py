"""Layer-removal criteria that look at what removing a layer does, computed on calibration batches
of the user's own training rows (DESIGN.md section 7). IGIA (the paper's criterion) lives in
importance.py; these are its alternatives and the baselines it is measured against.

Calibration batches are encoded rows as measures.py describes them; the losses and KL come from there.

* ``greedy_order`` removes, round by round, the layer whose removal (on top of the earlier ones)
  damages the model least: by KL from the dense model's predictions over all real tokens
  (``kl``, damage.py) or by the loss on the answer tokens (``skip_loss``). Each round runs every
  batch once to cache each remaining layer's input, so trying layer j costs only the layers after
  it; one batch's inputs are held at a time.
* ``block_influence`` (ShortGPT, arXiv 2403.03853): BI_l = 1 - mean over tokens of cos(h_l, h_{l+1}).
* ``angular_block`` (Gromov et al., arXiv 2403.17887): the n contiguous layers [l, l+n) whose input
  and output, at the last token, have the smallest angular distance arccos(cos) / pi.
* ``last_layers`` (reverse order, arXiv 2411.15558) and ``random_layers``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
from torch import nn

from .architecture import decoder_layers, final_norm
from .damage import Head, kl_sum
from .measures import Batch, NonFiniteError, final_hidden, hidden_entering, hidden_leaving, loss_sum, reference_of
from .surgery import layers_view

GREEDY_MEASURES = ("kl", "skip_loss")


def _layer_inputs(model: nn.Module, batch: Batch, kept: Sequence[int]) -> dict[int, torch.Tensor]:
    """The hidden state entering each layer of ``kept`` (and the last one's output, under key -1)."""
    layers = decoder_layers(model)
    seen: dict[int, torch.Tensor] = {}
    hooks = []
    for j in kept:

        def grab(module, args, kwargs, j=j):
            seen[j] = hidden_entering(args, kwargs).detach()

        hooks.append(layers[j].register_forward_pre_hook(grab, with_kwargs=True))

    def grab_out(module, args, output):
        seen[-1] = hidden_leaving(output).detach()

    hooks.append(layers[kept[-1]].register_forward_hook(grab_out))
    try:
        with layers_view(model, kept):
            final_hidden(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def _run_from(model: nn.Module, batch: Batch, state: torch.Tensor, after: Sequence[int]) -> torch.Tensor:
    """Final hidden states when ``state`` enters the layers ``after`` (every other layer skipped).

    ``state`` replaces the input of the first of them (or of the final norm), so whatever the
    decoder does to its embeddings (Gemma scales them) and its rotary/mask set-up stay its own.
    """
    target = decoder_layers(model)[after[0]] if after else final_norm(model)

    def inject(module, args, kwargs):
        if args:
            return (state, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": state}

    handle = target.register_forward_pre_hook(inject, with_kwargs=True)
    try:
        with layers_view(model, after):
            return final_hidden(model, batch)
    finally:
        handle.remove()


@torch.inference_mode()
def greedy_order(
    model: nn.Module,
    batches: Sequence[Batch],
    count: int,
    measure: str = "kl",
    start: Sequence[tuple[int, float]] = (),
    single: dict[int, float] | None = None,
) -> list[tuple[int, float]]:
    """Greedy removal order by damage: each round removes the layer whose removal, together with the
    earlier ones, gives the smallest ``measure`` on ``batches`` (``kl``: mean KL from the dense
    model's predictions over all real tokens; ``skip_loss``: mean loss on the labelled tokens),
    until ``count`` layers are removed. Returns (layer, measure after removing it and all before it).
    ``start``, an order this function returned for the same model, batches and measure, is continued
    rather than recomputed (the first k rounds do not depend on ``count``). Ties remove the deeper
    layer; a NaN/inf value is never chosen, and a round with no finite value stops the search.
    ``single``, if given, receives the first round's values: the measure after removing each layer
    alone (only when the search starts from nothing).
    """
    if measure not in GREEDY_MEASURES:
        raise ValueError(f"unknown greedy measure {measure!r}; choose from {', '.join(GREEDY_MEASURES)}")
    layers = decoder_layers(model)
    if not 0 <= count < len(layers):
        raise ValueError(f"cannot remove {count} of {len(layers)} layers")
    order = list(start[:count])
    kept = [j for j in range(len(layers)) if j not in {j for j, _ in order}]
    if count == len(order):
        return order
    was_training = model.training
    model.eval()
    head = Head(model) if measure == "kl" else None
    dense = reference_of(model, batches) if measure == "kl" else [None] * len(batches)
    from tqdm import tqdm

    rounds = tqdm(range(count - len(order)), desc=f"GradPruner {measure} search", unit="layer", leave=False,
                  disable=count - len(order) < 2)  # fmt: skip
    try:
        for _ in rounds:
            sums = dict.fromkeys(kept, 0.0)
            tokens = dict.fromkeys(kept, 0)
            for batch, reference in zip(batches, dense):
                inputs = _layer_inputs(model, batch, kept)
                for pos, j in enumerate(kept):
                    hidden = _run_from(model, batch, inputs[j], kept[pos + 1 :])
                    if reference is None:
                        value, n = loss_sum(model, hidden, batch["labels"])
                        value = value.item()
                    else:
                        value, n = kl_sum(head, hidden, reference)
                    sums[j] += value
                    tokens[j] += n
                del inputs
            values = {j: sums[j] / max(tokens[j], 1) for j in kept}
            if single is not None and not order:
                single.update(values)
            finite = [j for j in kept if math.isfinite(values[j])]
            if not finite:
                dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
                raise NonFiniteError(
                    f"the {measure} criterion measured NaN/inf for every remaining layer in {dtype} after removing "
                    f"{[j for j, _ in order]}: the model overflows in {dtype}; run the prune step in bfloat16 or "
                    "float32 (a checkpoint saved in float16 is loaded as float16)"
                )
            best = min(finite, key=lambda j: (values[j], -j))
            kept.remove(best)
            order.append((best, values[best]))
    finally:
        model.train(was_training)
    return order


def skip_loss_order(
    model: nn.Module, batches: Sequence[Batch], count: int, start: Sequence[tuple[int, float]] = ()
) -> list[tuple[int, float]]:
    """``greedy_order`` by the loss on the labelled tokens (the ``skip_loss`` criterion)."""
    return greedy_order(model, batches, count, "skip_loss", start)


@torch.inference_mode()
def block_influence(model: nn.Module, batches: Sequence[Batch]) -> list[float]:
    """ShortGPT's Block Influence of each layer: 1 - mean cos(input, output) over real tokens.

    Each layer's cosines are summed as the forward pass leaves it, so no more than one layer's input
    and output are held at a time (a 70B model at 4k tokens would need ~5 GiB for all of them)."""
    layers = decoder_layers(model)
    sums, tokens = [0.0] * len(layers), 0
    real: torch.Tensor | None = None
    hooks = []
    for j, layer in enumerate(layers):

        def measure(module, args, kwargs, output, j=j):
            entering, leaving = hidden_entering(args, kwargs), hidden_leaving(output)
            cos = nn.functional.cosine_similarity(entering.float(), leaving.float(), dim=-1)
            sums[j] += float(cos[real.to(cos.device)].sum())

        hooks.append(layer.register_forward_hook(measure, with_kwargs=True))
    try:
        for batch in batches:
            real = batch["attention_mask"].bool()
            final_hidden(model, batch)
            tokens += int(real.sum())
    finally:
        for hook in hooks:
            hook.remove()
    influence = [1 - s / tokens for s in sums]
    if not all(math.isfinite(value) for value in influence):
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        bad = [j for j, value in enumerate(influence) if not math.isfinite(value)]
        raise NonFiniteError(
            f"the block_influence criterion measured NaN/inf for layers {bad} in {dtype}: the model overflows in "
            f"{dtype}; run the prune step in bfloat16 or float32 (a checkpoint saved in float16 is loaded as float16)"
        )
    return influence


@torch.inference_mode()
def angular_block(model: nn.Module, batches: Sequence[Batch], size: int) -> tuple[int, list[float]]:
    """Gromov et al.'s block: start l of the ``size`` contiguous layers whose input h_l and output
    h_{l+size} are closest, mean arccos(cos)/pi over each row's last real token; and all distances."""
    num = len(decoder_layers(model))
    if not 1 <= size < num:
        raise ValueError(f"block size must be between 1 and {num - 1}, not {size}")
    kept = list(range(num))
    sums = [0.0] * (num - size + 1)
    rows = 0
    for batch in batches:
        seen = _layer_inputs(model, batch, kept)
        last = batch["attention_mask"].sum(dim=1) - 1
        pick = torch.arange(last.numel())
        # On the CPU: a device_map puts the layers on several GPUs (rows x hidden numbers each).
        states = [seen[j][pick.to(seen[j].device), last.to(seen[j].device)].float().cpu() for j in [*kept, -1]]
        for start in range(num - size + 1):
            cos = nn.functional.cosine_similarity(states[start], states[start + size], dim=-1).clamp(-1, 1)
            sums[start] += float((torch.arccos(cos) / math.pi).sum())
        rows += last.numel()
    distances = [s / rows for s in sums]
    # The last layer (block ending at num) is allowed, as in the paper; ties take the deeper block.
    best = min(range(len(distances)), key=lambda start: (distances[start], -start))
    return best, distances


def last_layers(num_layers: int, count: int) -> list[int]:
    """The ``count`` layers just before the final one (the final layer is kept)."""
    if not 1 <= count < num_layers - 1:
        raise ValueError(f"cannot remove {count} layers before the last of {num_layers}")
    return list(range(num_layers - 1 - count, num_layers - 1))


def removed_layers(
    model: nn.Module,
    criterion: str,
    count: int,
    calibration: Sequence[Batch] | None,
    cache: dict | None = None,
) -> tuple[list[int], dict]:
    """The ``count`` layers ``criterion`` removes, in removal order, and what it measured (for the report).

    ``cache`` (optional) keeps the measurements for further calls on the same model and batches,
    e.g. another budget: the greedy skip-loss order of n layers is the start of the order of n + k.
    """
    cache = {} if cache is None else cache
    num = len(decoder_layers(model))
    if criterion in (*GREEDY_MEASURES, "block_influence", "angular") and not calibration:
        raise ValueError(f"the {criterion} criterion needs calibration batches of training rows")
    if criterion in GREEDY_MEASURES:
        single = cache.setdefault(f"{criterion}/single", {})
        if len(cache.get(criterion, ())) < count:
            cache[criterion] = greedy_order(model, calibration, count, criterion, cache.get(criterion, ()), single)
        order = cache[criterion][:count]
        name = "kl" if criterion == "kl" else "loss"
        return [j for j, _ in order], {f"{name}_after_removal": [v for _, v in order],
                                       f"{name}_removing_one_layer": [single.get(j) for j in range(num)]}  # fmt: skip
    if criterion == "block_influence":
        if "block_influence" not in cache:
            cache["block_influence"] = block_influence(model, calibration)
        influence = cache["block_influence"]
        return sorted(range(num), key=lambda j: (influence[j], -j))[:count], {"block_influence": influence}
    if criterion == "angular":
        if ("angular", count) not in cache:
            cache[("angular", count)] = angular_block(model, calibration, count)
        start, distances = cache[("angular", count)]
        return list(range(start, start + count)), {"angular_distance": distances}
    if criterion == "last":
        return last_layers(num, count), {}
    raise ValueError(f"unknown removal criterion {criterion!r}")


def random_layers(num_layers: int, count: int, seed: int) -> list[int]:
    return sorted(random.Random(seed).sample(range(num_layers), count))
