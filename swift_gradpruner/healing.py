"""Seam healing: after a run of layers is removed, fit the kept layer next to it so that it reproduces,
on its own, what the dense model computed across the whole run (a seam-local distillation).

A *seam* is one contiguous run ``[a, b]`` of removed layers and the kept layer ``k`` that stands in for it:
the layer before the run (``k = a - 1``), or the first kept layer after it when the run starts at layer 0.
The block it replaces is ``[min(k, a), max(k, b)]``; when that first kept layer also precedes the next
run, its seam spans both runs (``seams_of``), so that no layer is trained for two seams. On calibration
rows the dense model gives, per seam, the hidden state entering the block (``x``) and the one leaving it
(``y``); healing trains ``k``'s weights (all of them, or only its MLP output projection) with Adam so that
``layer_k(x)`` is close to ``y`` over the real tokens: ``1 - cos`` (default) or the squared error relative
to ``|y|^2``. The inputs are the dense model's (teacher forcing), so the seams are fitted independently of
each other.

The result is still a plain checkpoint of the same architecture: only existing weights change.

``full_modules`` names the other healing tried (issue 26 (c)): the recovery fine-tune trains the layers at
the cuts (or the last layers and the final norm) in full beside LoRA, as swift's ``--modules_to_save`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .architecture import decoder_layers, final_norm, layers_prefix, module_name
from .measures import Batch, evaluating, final_hidden, hidden_entering, hidden_leaving

LOSSES = ("cosine", "mse")
SCOPES = ("layer", "mlp_out")
FULL = ("seams", "last")
"""What recovery may train in full beside LoRA: the kept layer at each cut, or the last two layers and the norm."""


@dataclass(frozen=True)
class Seam:
    layer: int
    """The kept layer that is trained (index in the dense model)."""
    first: int
    """First dense layer of the block that ``layer`` stands in for."""
    last: int
    """Last dense layer of that block."""


@dataclass
class SeamRows:
    """What the dense model computed on one calibration batch around one seam."""

    entering: torch.Tensor
    leaving: torch.Tensor
    real: torch.Tensor
    """Boolean mask of the real (not padding) tokens."""
    kwargs: dict = field(default_factory=dict)
    """The other arguments the decoder passed to the trained layer (masks, rotary embeddings)."""


def seams_of(num_layers: int, removed: Sequence[int]) -> list[Seam]:
    """One seam per kept layer that stands in for removed layers, in layer order. A kept layer between a
    run that starts at layer 0 and the next run (``[0, 2]`` of 10: layer 1) stands in for both: in the
    pruned model it takes the embeddings and feeds the layer after the second run, so its one seam spans
    both runs (block ``[0, 2]``), and it is trained and measured once, against that whole block."""
    gone = set(removed)
    kept = [j for j in range(num_layers) if j not in gone]
    if not kept:
        raise ValueError("cannot heal a model with every layer removed")
    out: list[Seam] = []
    start = None
    for j in range(num_layers + 1):
        if j < num_layers and j in gone:
            start = j if start is None else start
        elif start is not None:
            run_last = j - 1
            layer = start - 1 if start > 0 else min(k for k in kept if k > run_last)
            seam = Seam(layer, min(layer, start), max(layer, run_last))
            if out and out[-1].layer == layer:  # the layer after the run at 0 precedes this run too
                seam = Seam(layer, out.pop().first, seam.last)
            out.append(seam)
            start = None
    return out


def full_modules(model: nn.Module, removed: Sequence[int], num_layers: int, which: str) -> list[str]:
    """Module names in the pruned ``model`` (``removed`` of ``num_layers`` gone) that recovery trains in
    full beside LoRA (peft's ``modules_to_save``; swift's ``--modules_to_save``, the same names):
    ``seams``, the kept layer standing in for each removed run (``seams_of``); ``last``, the last two
    layers and the final norm."""
    if which not in FULL:
        raise ValueError(f"full={which!r}: use {' or '.join(FULL)}")
    gone = set(removed)
    kept = [j for j in range(num_layers) if j not in gone]
    prefix = layers_prefix(model)
    if which == "seams":
        return [f"{prefix}{kept.index(seam.layer)}" for seam in seams_of(num_layers, removed)]
    return [f"{prefix}{i}" for i in range(max(0, len(kept) - 2), len(kept))] + [module_name(model, final_norm(model))]


@torch.no_grad()
def dense_rows(dense: nn.Module, batches: Sequence[Batch], seams: Sequence[Seam]) -> list[list[SeamRows]]:
    """Per seam, per batch: the dense model's hidden state entering and leaving the seam's block, and the
    other arguments the decoder passes to the trained layer (its own: masks differ by layer type)."""
    layers = decoder_layers(dense)
    out: list[list[SeamRows]] = [[] for _ in seams]
    current: dict[int, dict] = {}
    hooks = []
    for s, seam in enumerate(seams):

        def enter(module, args, kwargs, s=s):
            current.setdefault(s, {})["entering"] = hidden_entering(args, kwargs).detach().clone()

        def arguments(module, args, kwargs, s=s):
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            current.setdefault(s, {})["kwargs"] = _detached(rest)

        def leave(module, args, output, s=s):
            current.setdefault(s, {})["leaving"] = hidden_leaving(output).detach().clone()

        hooks.append(layers[seam.first].register_forward_pre_hook(enter, with_kwargs=True))
        hooks.append(layers[seam.layer].register_forward_pre_hook(arguments, with_kwargs=True))
        hooks.append(layers[seam.last].register_forward_hook(leave))
    try:
        with evaluating(dense):
            for batch in batches:
                current.clear()
                final_hidden(dense, batch)
                for s in range(len(seams)):
                    real = batch["attention_mask"].bool().to(current[s]["entering"].device)
                    out[s].append(SeamRows(real=real, **current[s]))
    finally:
        for hook in hooks:
            hook.remove()
    return out


def seam_loss(output: torch.Tensor, target: torch.Tensor, real: torch.Tensor, loss: str = "cosine") -> torch.Tensor:
    """Mean over real tokens of ``1 - cos(output, target)``, or of ``|output - target|^2 / |target|^2``."""
    output, target = output[real].float(), target[real].float()
    if loss == "cosine":
        return (1 - nn.functional.cosine_similarity(output, target, dim=-1)).mean()
    if loss == "mse":
        return ((output - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-12)).mean()
    raise ValueError(f"seam loss must be one of {LOSSES}, not {loss!r}")


def trainable(layer: nn.Module, scope: str) -> list[nn.Parameter]:
    """The parameters of ``layer`` that healing changes: all, or the MLP's output projection."""
    if scope == "layer":
        return list(layer.parameters())
    if scope == "mlp_out":
        found = [p for name, p in layer.named_parameters() if name.endswith(("down_proj.weight", "fc2.weight"))]
        if not found:
            raise ValueError("heal scope mlp_out needs an MLP output projection named down_proj or fc2")
        return found
    raise ValueError(f"heal scope must be one of {SCOPES}, not {scope!r}")


def layer_output(layer: nn.Module, rows: SeamRows) -> torch.Tensor:
    return hidden_leaving(layer(rows.entering, **rows.kwargs))


def heal_seams(
    pruned: nn.Module,
    kept: Sequence[int],
    seams: Sequence[Seam],
    rows: Sequence[Sequence[SeamRows]],
    *,
    steps: int = 200,
    lr: float = 1e-4,
    loss: str = "cosine",
    scope: str = "layer",
) -> list[dict[str, float]]:
    """Train each seam's kept layer (in ``pruned``, whose layers are the dense ``kept`` ones) for ``steps``
    Adam steps over its batches in turn; return each seam's mean loss over its batches before and after."""
    layers = decoder_layers(pruned)
    position = {j: i for i, j in enumerate(kept)}
    report = []
    for seam, batches in zip(seams, rows, strict=True):
        layer = layers[position[seam.layer]]
        params = trainable(layer, scope)
        flags = [(p, p.requires_grad) for p in layer.parameters()]
        for p in layer.parameters():
            p.requires_grad_(any(p is q for q in params))
        before = _mean_loss(layer, batches, loss)
        optimizer = torch.optim.Adam(params, lr=lr)
        with evaluating(layer):
            for step in range(steps):
                item = batches[step % len(batches)]
                value = seam_loss(layer_output(layer, item), item.leaving, item.real, loss)
                value.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        for p, flag in flags:
            p.requires_grad_(flag)
        report.append({"layer": seam.layer, "block": [seam.first, seam.last], "loss_before": before,
                       "loss_after": _mean_loss(layer, batches, loss)})  # fmt: skip
    return report


@torch.no_grad()
def _mean_loss(layer: nn.Module, batches: Sequence[SeamRows], loss: str) -> float:
    with evaluating(layer):
        return sum(float(seam_loss(layer_output(layer, b), b.leaving, b.real, loss)) for b in batches) / len(batches)


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value
