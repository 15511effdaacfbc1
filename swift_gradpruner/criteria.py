"""Layer-removal criteria that look at what removing a layer does, computed on calibration batches
of the user's own training rows (DESIGN.md section 7). IGIA (the paper's criterion) lives in
importance.py; these are its alternatives and the baselines it is measured against.

A calibration batch is a dict with ``input_ids``, ``attention_mask`` and ``labels`` (-100 where a
token is not scored, as swift's collator and the eval harness make them).

* ``skip_loss_order`` (task-aware removal damage): repeatedly remove the layer whose removal raises
  the answer loss least. Each round caches every remaining layer's input once, so trying layer j
  costs only the layers after it.
* ``block_influence`` (ShortGPT, arXiv 2403.03853): BI_l = 1 - mean over tokens of cos(h_l, h_{l+1}).
* ``angular_block`` (Gromov et al., arXiv 2403.17887): the n contiguous layers [l, l+n) whose input
  and output, at the last token, have the smallest angular distance arccos(cos) / pi.
* ``last_layers`` (reverse order, arXiv 2411.15558) and ``random_layers``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .architecture import decoder_layers
from .surgery import layers_view

Batch = dict[str, torch.Tensor]


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder stack (returns final hidden states) and the LM head of a causal LM (peft or not)."""
    return model.get_decoder(), model.get_output_embeddings()


def _loss_sum(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled tokens; the head runs on those rows only."""
    targets = labels[:, 1:].to(hidden.device)
    keep = targets != -100
    logits = head(hidden[:, :-1][keep]).float()
    return nn.functional.cross_entropy(logits, targets[keep], reduction="sum"), int(keep.sum())


def answer_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens of one batch (differentiable)."""
    backbone, head = backbone_and_head(model)
    device = head.weight.device
    hidden = backbone(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False
    ).last_hidden_state
    total, count = _loss_sum(head, hidden, batch["labels"])
    return total / max(count, 1)


@torch.inference_mode()
def mean_loss(model: nn.Module, batches: Iterable[Batch]) -> float:
    """Token-weighted mean loss of ``model`` over the labelled tokens of ``batches``."""
    backbone, head = backbone_and_head(model)
    device = head.weight.device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            hidden = backbone(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                use_cache=False,
            ).last_hidden_state
            value, n = _loss_sum(head, hidden, batch["labels"])
            total, count = total + value.item(), count + n
    finally:
        model.train(was_training)
    return total / max(count, 1)


def _layer_inputs(model: nn.Module, batch: Batch, kept: Sequence[int]) -> dict[int, torch.Tensor]:
    """The hidden state entering each layer of ``kept`` (and the last one's output, under key -1)."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    seen: dict[int, torch.Tensor] = {}
    hooks = []
    for j in kept:

        def grab(module, args, kwargs, j=j):
            seen[j] = (args[0] if args else kwargs["hidden_states"]).detach()

        hooks.append(layers[j].register_forward_pre_hook(grab, with_kwargs=True))

    def grab_out(module, args, output):
        seen[-1] = (output[0] if isinstance(output, tuple) else output).detach()

    hooks.append(layers[kept[-1]].register_forward_hook(grab_out))
    try:
        with layers_view(model, kept):
            model.get_decoder()(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                use_cache=False,
            )
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@torch.inference_mode()
def skip_loss_order(
    model: nn.Module, batches: Sequence[Batch], count: int, start: Sequence[tuple[int, float]] = ()
) -> list[tuple[int, float]]:
    """Greedy removal order by damage: each round removes the layer whose removal gives the lowest
    loss on ``batches``, until ``count`` layers are removed. Returns (layer, loss after removing it
    and all before it). ``start``, an order this function returned for the same model and batches,
    is continued rather than recomputed (greedy: the first k rounds do not depend on ``count``)."""
    layers = decoder_layers(model)
    order = list(start[:count])
    kept = [j for j in range(len(layers)) if j not in {j for j, _ in order}]
    if not 0 <= count < len(layers):
        raise ValueError(f"cannot remove {count} of {len(layers)} layers")
    backbone, head = backbone_and_head(model)
    device = head.weight.device
    was_training = model.training
    model.eval()
    from tqdm import tqdm

    rounds = tqdm(range(count - len(order)), desc="GradPruner skip-loss", unit="layer", leave=False,
                  disable=count - len(order) < 2)  # fmt: skip
    try:
        for _ in rounds:
            inputs = [_layer_inputs(model, batch, kept) for batch in batches]
            best: tuple[float, int] | None = None
            for pos, j in enumerate(kept):
                after = kept[pos + 1 :]
                total, tokens = 0.0, 0
                with layers_view(model, after):
                    for batch, seen in zip(batches, inputs):
                        hidden = backbone(
                            inputs_embeds=seen[j], attention_mask=batch["attention_mask"].to(device), use_cache=False
                        ).last_hidden_state
                        value, n = _loss_sum(head, hidden, batch["labels"])
                        total, tokens = total + value.item(), tokens + n
                loss = total / max(tokens, 1)
                if best is None or loss < best[0]:
                    best = (loss, j)
            kept.remove(best[1])
            order.append((best[1], best[0]))
    finally:
        model.train(was_training)
    return order


@torch.inference_mode()
def block_influence(model: nn.Module, batches: Sequence[Batch]) -> list[float]:
    """ShortGPT's Block Influence of each layer: 1 - mean cos(input, output) over real tokens."""
    num = len(decoder_layers(model))
    kept = list(range(num))
    sums, tokens = [0.0] * num, 0
    for batch in batches:
        seen = _layer_inputs(model, batch, kept)
        real = batch["attention_mask"].to(seen[0].device).bool()
        for j in kept:
            out = seen[j + 1] if j + 1 < num else seen[-1]
            cos = nn.functional.cosine_similarity(seen[j].float(), out.float(), dim=-1)
            sums[j] += float(cos[real].sum())
        tokens += int(real.sum())
    return [1 - s / tokens for s in sums]


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
        states = [seen[j][pick, last.to(seen[j].device)].float() for j in kept] + [seen[-1][pick, last].float()]
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
    if criterion in ("skip_loss", "block_influence", "angular") and not calibration:
        raise ValueError(f"the {criterion} criterion needs calibration batches of training rows")
    if criterion == "skip_loss":
        if len(cache.get("skip_loss", ())) < count:
            cache["skip_loss"] = skip_loss_order(model, calibration, count, cache.get("skip_loss", ()))
        order = cache["skip_loss"][:count]
        return [j for j, _ in order], {"loss_after_removal": [v for _, v in order]}
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
