"""What the model does on batches of encoded rows: its logits, its answer loss, and its KL divergence
from the dense model's predictions (damage.py holds the closed form). The removal criteria
(criteria.py), the quality guard (guard.py) and the eval harness measure with these.

A batch is a dict with ``input_ids``, ``attention_mask`` and ``labels`` (-100 where a token is not
scored, as swift's collator and the eval harness make them).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .config import GradPruneConfigError
from .damage import DenseTargets, Head, dense_targets, kl_sum

Batch = dict[str, torch.Tensor]


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block, back in its own mode after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class NonFiniteError(GradPruneConfigError):
    """A removal measure came out NaN or infinite (e.g. float16 overflow)."""


def hidden_entering(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden state a decoder layer was called with (from a forward pre-hook's args/kwargs)."""
    return args[0] if args else kwargs["hidden_states"]


def hidden_leaving(output) -> torch.Tensor:
    """The hidden state a decoder layer returned (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder stack (returns final hidden states) and the LM head of a causal LM (peft or not)."""
    return model.get_decoder(), model.get_output_embeddings()


def output_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits (float32) of final hidden states, soft-capped where the model caps them
    (Gemma 2 does that in its ForCausalLM forward, outside the head)."""
    logits = model.get_output_embeddings()(hidden).float()
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cap = getattr(config, "final_logit_softcapping", None)
    return cap * torch.tanh(logits / cap) if cap else logits


def loss_sum(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled tokens; the head runs on those rows only."""
    targets = labels[:, 1:].to(hidden.device)
    keep = targets != -100
    logits = output_logits(model, hidden[:, :-1][keep])  # on the head's device (a device_map may differ)
    return nn.functional.cross_entropy(logits, targets[keep].to(logits.device), reduction="sum"), int(keep.sum())


def final_hidden(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The decoder's output (after the final norm) for one batch, on the head's device."""
    device = model.get_output_embeddings().weight.device
    return model.get_decoder()(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False
    ).last_hidden_state


def answer_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens of one batch (differentiable)."""
    total, count = loss_sum(model, final_hidden(model, batch), batch["labels"])
    return total / max(count, 1)


@torch.inference_mode()
def mean_loss(model: nn.Module, batches: Iterable[Batch]) -> float:
    """Token-weighted mean loss of ``model`` over the labelled tokens of ``batches``."""
    total, count = 0.0, 0
    with evaluating(model):
        for batch in batches:
            value, n = loss_sum(model, final_hidden(model, batch), batch["labels"])
            total, count = total + value.item(), count + n
    return total / max(count, 1)


@torch.inference_mode()
def reference_of(model: nn.Module, batches: Sequence[Batch]) -> list[DenseTargets]:
    """The model's own predictions on ``batches``, as the KL measure compares against them."""
    head = Head(model)
    with evaluating(model):
        targets = [dense_targets(head, final_hidden(model, b), b["attention_mask"]) for b in batches]
    if not all(bool(t.finite()) for t in targets):
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        raise NonFiniteError(
            f"the unpruned model's predictions on the calibration rows are NaN/inf in {dtype}: the model overflows "
            f"in {dtype}; run the prune step in bfloat16 or float32 (a float16 checkpoint is loaded as float16)"
        )
    return targets


@torch.inference_mode()
def mean_kl(model: nn.Module, batches: Sequence[Batch], dense: Sequence[DenseTargets]) -> float:
    """Mean KL(dense || model) per real token of ``batches`` (``dense`` from ``reference_of``)."""
    head = Head(model)
    with evaluating(model):
        sums = [kl_sum(head, final_hidden(model, b), d) for b, d in zip(batches, dense)]
    return sum(s for s, _ in sums) / max(sum(n for _, n in sums), 1)
