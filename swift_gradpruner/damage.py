"""How far a pruned model's next-token predictions move away from the dense model's.

The measure is the mean, over every real token of some rows, of KL(p_dense || p_pruned) in nats per
token. Unlike a loss on the answer tokens it cannot fall when pruning makes the model less
confident: it is 0 only when the predictions are unchanged and grows whenever they move, in any
direction, at any position (prompt tokens included), so short answers still give thousands of
measured tokens. It needs no labels.

An exact shortcut keeps the dense side small. With logits z = W h + b,
KL = sum_v p_v log p_v - p.z_q + logsumexp(z_q), and p.z_q = (W^T p).h_q + p.b, so each dense token
keeps only u = W^T p (a hidden-size vector) and the constant sum p log p - p.b, and measuring a
pruned model costs one LM-head pass. Models that soft-cap their logits (Gemma 2/3) are not linear in
h: for them the dense log-probabilities themselves are kept. The head runs in float32 (the same
numbers as the model's own float32 logits), in chunks of at most LOGIT_CHUNK elements; the
softmax, the constant and the sums are float64, since KL = constant - cross term + logsumexp
subtracts numbers of the logits' size (float32 there left an error of ~2e-4 nats/token on
SmolLM2's 49k vocabulary, float64 ~2e-6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

LOGIT_CHUNK = 1 << 25
"""Largest number of logits (tokens x vocabulary) materialised at once: 128 MiB in float32."""


class Head:
    """A causal LM's output head in float32: logits of final hidden states, soft-capped if the model does."""

    def __init__(self, model: nn.Module) -> None:
        head = model.get_output_embeddings()
        self.weight = head.weight.detach().float()
        bias = getattr(head, "bias", None)
        self.bias = None if bias is None else bias.detach().float()
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.fingerprint = (float(self.weight.double().sum()), float(self.weight.double().square().sum()))
        """The closed form needs the dense model's head in the pruned one: pruning never changes it."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        z = nn.functional.linear(hidden.float(), self.weight, self.bias)
        return self.softcap * torch.tanh(z / self.softcap) if self.softcap else z

    def chunks(self, hidden: torch.Tensor) -> list[slice]:
        rows = max(1, LOGIT_CHUNK // self.weight.shape[0])
        return [slice(i, min(i + rows, hidden.shape[0])) for i in range(0, hidden.shape[0], rows)]


@dataclass
class DenseTargets:
    """What the KL needs of the dense model's predictions on one batch (real tokens only, row-major)."""

    mask: torch.Tensor
    """(batch, seq) bool: the real tokens, whose predictions are compared."""
    head: tuple[float, float]
    """Fingerprint of the head the targets were made with (``Head.fingerprint``)."""
    u: torch.Tensor | None
    """(tokens, hidden) W^T p per token (linear heads), float64."""
    const: torch.Tensor | None
    """(tokens,) sum_v p log p - p.b per token (linear heads), float64."""
    logprobs: torch.Tensor | None = None
    """(tokens, vocab) log p (soft-capped heads only)."""

    def finite(self) -> bool:
        """Whether the dense predictions are usable (no NaN/inf, e.g. from a float16 overflow)."""
        held = [self.logprobs.exp()] if self.logprobs is not None else [self.u, self.const]
        return all(bool(torch.isfinite(t).all()) for t in held)


@torch.inference_mode()
def dense_targets(head: Head, hidden: torch.Tensor, attention_mask: torch.Tensor) -> DenseTargets:
    """The dense model's side of the KL from its final hidden states ``hidden`` (batch, seq, hidden)."""
    mask = attention_mask.to(hidden.device).bool()
    states = hidden[mask]
    if head.softcap:
        logprobs = torch.cat([torch.log_softmax(head.logits(states[c]), -1) for c in head.chunks(states)])
        return DenseTargets(mask=mask, head=head.fingerprint, u=None, const=None, logprobs=logprobs)
    us, consts = [], []
    for chunk in head.chunks(states):
        logp = torch.log_softmax(head.logits(states[chunk]).double(), -1)  # float64: the constant cancels in KL
        p = logp.exp()
        const = (p * logp).sum(-1)
        if head.bias is not None:
            const -= p @ head.bias.double()
        us.append((p.float() @ head.weight).double())
        consts.append(const)
    return DenseTargets(mask=mask, head=head.fingerprint, u=torch.cat(us), const=torch.cat(consts))


@torch.inference_mode()
def kl_sum(head: Head, hidden: torch.Tensor, dense: DenseTargets) -> tuple[float, int]:
    """Summed KL(p_dense || p_pruned) over the real tokens of one batch, and their number.

    ``hidden`` are the pruned model's final hidden states on the same batch as ``dense``; ``head`` must
    be the dense model's (pruning removes decoder layers, never the head).
    """
    if head.fingerprint != dense.head:
        raise ValueError("the KL from the dense model needs the dense model's LM head; this model's head differs")
    states = hidden[dense.mask]
    total = torch.zeros((), dtype=torch.float64, device=states.device)
    for chunk in head.chunks(states):
        z = head.logits(states[chunk]).double()
        lse = torch.logsumexp(z, -1)
        if dense.logprobs is None:
            kl = dense.const[chunk] - (states[chunk].double() * dense.u[chunk]).sum(-1) + lse
        else:
            logp = dense.logprobs[chunk]
            kl = (logp.exp() * (logp - (z - lse[:, None]))).sum(-1)
        total += kl.double().sum()
    return float(total), int(states.shape[0])
