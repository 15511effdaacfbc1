"""damage.py's KL against brute force (full float64 softmaxes of both sides), for linear and soft-capped
heads, chunked or not; what the dense side holds (no vocabulary-sized tensors, no copy of the head);
which heads it accepts."""

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from swift_gradpruner import damage

VOCAB, HIDDEN = 97, 16


class Toy(nn.Module):
    """Just what Head reads of a causal LM: the output embeddings and the config's soft cap."""

    def __init__(self, softcap=None, bias=False, dtype=torch.float32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=bias).to(dtype)
        with torch.no_grad():
            self.lm_head.weight.mul_(8.0)  # confident predictions: logits of a few tens, into the soft cap
        self.config = SimpleNamespace(final_logit_softcapping=softcap)

    def get_output_embeddings(self):
        return self.lm_head


def brute_kl(model, dense_hidden, hidden, mask):
    """Sum over the real tokens of KL(p_dense || p) from full float64 log-softmaxes."""
    model = model.requires_grad_(False)
    weight = model.lm_head.weight.double()
    bias = None if model.lm_head.bias is None else model.lm_head.bias.double()
    cap = model.config.final_logit_softcapping

    def logp(h):
        z = nn.functional.linear(h[mask].double(), weight, bias)
        return torch.log_softmax(cap * torch.tanh(z / cap) if cap else z, -1)

    p, q = logp(dense_hidden), logp(hidden)
    return float((p.exp() * (p - q)).sum()), int(mask.sum())


def hiddens(dtype=torch.float32, scale=1.0):
    gen = torch.Generator().manual_seed(1)
    dense = torch.randn(3, 11, HIDDEN, generator=gen)
    pruned = dense + scale * torch.randn(3, 11, HIDDEN, generator=gen)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    return dense.to(dtype), pruned.to(dtype), mask


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("softcap,bias", [(None, False), (None, True), (5.0, False), (5.0, True)])
def test_kl_equals_brute_force(monkeypatch, softcap, bias, chunked):
    if chunked:  # 7 vocabulary rows per slice (14 slices, the last one short), 10 tokens per block
        monkeypatch.setattr(damage, "WEIGHT_CHUNK", 7 * HIDDEN)
        monkeypatch.setattr(damage, "LOGIT_CHUNK", 70)
    model = Toy(softcap, bias)
    head = damage.Head(model)
    assert len(head.slices()) == (14 if chunked else 1)
    for scale in (1.0, 0.05, 0.0):
        dense_hidden, hidden, mask = hiddens(scale=scale)
        dense = damage.dense_targets(head, dense_hidden, mask)
        total, count = damage.kl_sum(head, hidden, dense)
        expected, tokens = brute_kl(model, dense_hidden, hidden, mask.bool())
        assert count == tokens == 3 + 11 + 7
        assert total == pytest.approx(expected, rel=1e-5, abs=1e-5 * count), scale
    assert expected == 0.0 and scale == 0.0  # the last case: an unchanged model
    dense_hidden, hidden, mask = hiddens()
    assert brute_kl(model, dense_hidden, hidden, mask.bool())[0] > 1.0 * 21  # the cases above were not trivial


def test_soft_capped_targets_hold_no_vocabulary_sized_tensor():
    """Issue 25: the dense side of a soft-capped head once held (tokens, vocab) log-probs (16 GB for Gemma's
    256k vocabulary at 16k tokens); now (tokens, hidden) states in the model's dtype and one number per token."""
    model = Toy(softcap=5.0, dtype=torch.bfloat16)
    dense_hidden, hidden, mask = hiddens(torch.bfloat16)
    dense = damage.dense_targets(damage.Head(model), dense_hidden, mask)
    held = [t for t in (dense.u, dense.const, dense.states, dense.lse) if t is not None]
    assert dense.states.shape == (21, HIDDEN) and dense.states.dtype == torch.bfloat16 and dense.lse.shape == (21,)
    assert all(VOCAB not in t.shape for t in held) and dense.finite()


def test_head_keeps_the_models_own_weight_and_computes_in_float32():
    """No float32 copy of a bfloat16 head: the Head holds the model's tensor; the KL is that of the
    bfloat16 weights run in float32 (brute force in float64 on the same weights)."""
    model = Toy(dtype=torch.bfloat16)
    head = damage.Head(model)
    assert head.weight.data_ptr() == model.lm_head.weight.data_ptr() and head.weight.dtype == torch.bfloat16
    dense_hidden, hidden, mask = hiddens(torch.bfloat16)
    total, _ = damage.kl_sum(head, hidden, damage.dense_targets(head, dense_hidden, mask))
    assert total == pytest.approx(brute_kl(model, dense_hidden, hidden, mask.bool())[0], rel=1e-5)


def test_a_different_head_is_refused_and_a_copy_of_the_same_is_accepted():
    model = Toy()
    dense_hidden, hidden, mask = hiddens()
    dense = damage.dense_targets(damage.Head(model), dense_hidden, mask)
    same = damage.kl_sum(damage.Head(model), hidden, dense)
    assert damage.kl_sum(damage.Head(copy.deepcopy(model)), hidden, dense) == same  # a reloaded dense model
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight[40, 3] += 1e-3  # one weight differs
    with pytest.raises(ValueError, match="head differs"):
        damage.kl_sum(damage.Head(other), hidden, dense)
    with pytest.raises(ValueError, match="head differs"):
        damage.kl_sum(damage.Head(Toy(dtype=torch.bfloat16)), hidden, dense)
