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
h: for them each dense token keeps its final hidden state and the logsumexp L_d of its logits, and the
dense logits are recomputed next to the pruned ones: KL = sum_v p_v (z_d - z_q) - L_d + logsumexp(z_q)
(exact; a 256k vocabulary's dense log-probs of 16k tokens would have been 16 GB, the hidden states of
a 3.5k-wide model are 115 MB).

The head runs in float32 (the same numbers as the model's own float32 logits) one slice of the
vocabulary at a time: each slice of W is converted to float32 once per pass (no float32 copy of the
whole head, which is 4 GB for a 70B model) and at most LOGIT_CHUNK logits exist at once. The
logsumexp is accumulated across slices. The softmax, the constant and the sums are float64, since
KL = constant - cross term + logsumexp subtracts numbers of the logits' size (float32 there left an
error of ~2e-4 nats/token on SmolLM2's 49k vocabulary, float64 ~2e-6).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

LOGIT_CHUNK = 1 << 25
"""Largest number of logits (tokens x vocabulary slice) materialised at once: 128 MiB in float32."""
WEIGHT_CHUNK = 1 << 25
"""Largest number of head weights converted to float32 at once (one vocabulary slice): 128 MiB."""


class Head:
    """A causal LM's output head, run in float32 by vocabulary slices: logits of final hidden states,
    soft-capped if the model does. Holds the model's own weight tensor (no copy)."""

    def __init__(self, model: nn.Module) -> None:
        head = model.get_output_embeddings()
        self.weight = head.weight.detach()
        bias = getattr(head, "bias", None)
        self.bias = None if bias is None else bias.detach()
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.softcap = getattr(config, "final_logit_softcapping", None)

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def same_as(self, other: torch.Tensor) -> bool:
        """Whether ``other`` (another head's weight) is this head: the same memory (pruning never touches
        the head), else the same shape and values (a freshly loaded copy of the dense model)."""
        weight = self.weight
        if (other.dtype, other.shape) != (weight.dtype, weight.shape):
            return False
        if (other.device, other.data_ptr(), other.stride()) == (weight.device, weight.data_ptr(), weight.stride()):
            return True  # the DenseTargets hold their head, so its memory cannot be another tensor's
        return all(torch.equal(weight[cols], other[cols].to(weight.device)) for cols in self.slices())

    def slices(self) -> list[slice]:
        """Vocabulary slices of at most WEIGHT_CHUNK weights."""
        vocab, width = self.weight.shape
        rows = max(1, WEIGHT_CHUNK // width)
        return [slice(i, min(i + rows, vocab)) for i in range(0, vocab, rows)]

    def blocks(self, *states: torch.Tensor) -> Iterator[tuple[slice, slice, torch.Tensor, list[torch.Tensor]]]:
        """(token rows, vocabulary slice, that slice of W in float32, float64 logits of each of ``states``
        on those rows and that slice), each slice of W converted once."""
        count = states[0].shape[0]
        for cols in self.slices():
            weight = self.weight[cols].float()
            bias = None if self.bias is None else self.bias[cols].float()
            step = max(1, LOGIT_CHUNK // weight.shape[0])
            for start in range(0, count, step):
                rows = slice(start, min(start + step, count))
                logits = [nn.functional.linear(s[rows].float(), weight, bias) for s in states]
                if self.softcap:
                    logits = [self.softcap * torch.tanh(z / self.softcap) for z in logits]
                yield rows, cols, weight, [z.double() for z in logits]

    def logsumexp(self, states: torch.Tensor) -> torch.Tensor:
        """(tokens,) float64 logsumexp of the logits of ``states`` (tokens, hidden)."""
        lse = torch.full((states.shape[0],), -torch.inf, dtype=torch.float64, device=self.device)
        for rows, _, _, (z,) in self.blocks(states):
            lse[rows] = torch.logaddexp(lse[rows], torch.logsumexp(z, -1))
        return lse


@dataclass
class DenseTargets:
    """What the KL needs of the dense model's predictions on one batch (real tokens only, row-major)."""

    mask: torch.Tensor
    """(batch, seq) bool: the real tokens, whose predictions are compared."""
    head: torch.Tensor
    """The dense model's head weight (a reference, not a copy): the closed form needs that head."""
    u: torch.Tensor | None = None
    """(tokens, hidden) W^T p per token (linear heads), float64."""
    const: torch.Tensor | None = None
    """(tokens,) sum_v p log p - p.b per token (linear heads), float64."""
    states: torch.Tensor | None = None
    """(tokens, hidden) final hidden states in the model's dtype (soft-capped heads only)."""
    lse: torch.Tensor | None = None
    """(tokens,) logsumexp of the dense logits, float64 (soft-capped heads only)."""

    def finite(self) -> bool:
        """Whether the dense predictions are usable (no NaN/inf, e.g. from a float16 overflow)."""
        held = [self.u, self.const] if self.states is None else [self.states, self.lse]
        return all(bool(torch.isfinite(t).all()) for t in held)


def _states(hidden: torch.Tensor, mask: torch.Tensor, head: Head) -> torch.Tensor:
    """The real tokens' final hidden states, on the head's device (a device_map may put the final norm and
    the head on different GPUs)."""
    return hidden[mask.to(hidden.device)].to(head.device)


@torch.inference_mode()
def dense_targets(head: Head, hidden: torch.Tensor, attention_mask: torch.Tensor) -> DenseTargets:
    """The dense model's side of the KL from its final hidden states ``hidden`` (batch, seq, hidden)."""
    mask = attention_mask.bool().cpu()
    states = _states(hidden, mask, head)
    lse = head.logsumexp(states)
    if head.softcap:
        return DenseTargets(mask=mask, head=head.weight, states=states, lse=lse)
    u = torch.zeros(states.shape, dtype=torch.float64, device=head.device)
    const = torch.zeros_like(lse)
    for rows, cols, weight, (z,) in head.blocks(states):
        logp = z - lse[rows, None]  # float64: the constant cancels in KL
        p = logp.exp()
        const[rows] += (p * logp).sum(-1)
        if head.bias is not None:
            const[rows] -= p @ head.bias[cols].double()
        u[rows] += (p.float() @ weight).double()
    return DenseTargets(mask=mask, head=head.weight, u=u, const=const)


@torch.inference_mode()
def kl_sum(head: Head, hidden: torch.Tensor, dense: DenseTargets) -> tuple[float, int]:
    """Summed KL(p_dense || p_pruned) over the real tokens of one batch, and their number.

    ``hidden`` are the pruned model's final hidden states on the same batch as ``dense``; ``head`` must
    be the dense model's (pruning removes decoder layers, never the head).
    """
    if not head.same_as(dense.head):
        raise ValueError("the KL from the dense model needs the dense model's LM head; this model's head differs")
    states = _states(hidden, dense.mask, head)
    if dense.states is None:
        kl = dense.const - (states.double() * dense.u).sum(-1) + head.logsumexp(states)
    else:
        cross = torch.zeros(states.shape[0], dtype=torch.float64, device=head.device)
        lse = torch.full_like(cross, -torch.inf)
        for rows, _, _, (z_dense, z) in head.blocks(dense.states, states):
            cross[rows] += ((z_dense - dense.lse[rows, None]).exp() * (z_dense - z)).sum(-1)
            lse[rows] = torch.logaddexp(lse[rows], torch.logsumexp(z, -1))
        kl = cross - dense.lse + lse
    return float(kl.sum()), int(states.shape[0])
