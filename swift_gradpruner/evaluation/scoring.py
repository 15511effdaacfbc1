"""Multiple-choice scoring by log-likelihood, with lm-evaluation-harness's conventions.

For each choice the model scores log P(continuation | context) (sum over the continuation's
tokens). ``acc``: the choice with the largest log-likelihood is right; ``acc_norm``: the same after
dividing each log-likelihood by the choice's length in characters. Tokenisation follows lm-eval's
``HFLM._encode_pair``: trailing spaces of the context move to the continuation, the pair is encoded
whole and the continuation's tokens are those after the context's own encoding; no BOS is added.

Speed (the same numbers, less work): continuations that share a context are packed into one row
behind a single copy of the context, with a 4D attention mask and position ids that make each one
see exactly what it would see alone; and only the positions that predict continuation tokens go
through the LM head (a 49k-row matmul per position on SmolLM2).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..measures import backbone_and_head
from .tasks import Item

MAX_LENGTH = 2048
BATCH_TOKENS = 4096


def encode_pair(tokenizer, context: str, continuation: str, chat: bool = False) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-eval's HFLM makes them; a chat pair as swift's
    template does (prompt and answer tokenised apart)."""
    if chat:
        return (tokenizer(context, add_special_tokens=False)["input_ids"],
                tokenizer(continuation, add_special_tokens=False)["input_ids"])  # fmt: skip
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return context_ids, whole[len(context_ids) :]


@dataclass
class Group:
    """Continuations that share one context, scored in one packed row."""

    context: list[int]
    continuations: list[list[int]]

    @property
    def width(self) -> int:
        return len(self.context) + sum(len(c) - 1 for c in self.continuations)


def group_pairs(encoded: Sequence[tuple[list[int], list[int]]]) -> tuple[list[Group], list[tuple[int, int]]]:
    """Pairs grouped by identical context tokens, and where each pair went: (group, index in group)."""
    groups: list[Group] = []
    where: list[tuple[int, int]] = []
    index: dict[tuple[int, ...], int] = {}
    for context, continuation in encoded:
        key = tuple(context)
        if key not in index:
            index[key] = len(groups)
            groups.append(Group(list(context), []))
        group = groups[index[key]]
        where.append((index[key], len(group.continuations)))
        group.continuations.append(list(continuation))
    return groups, where


def pack(groups: Sequence[Group]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[list[int]]]]:
    """One row per group: the context, then each continuation except its last token.

    Returns input ids, position ids and the boolean attention pattern (batch, query, key): each
    continuation sees the context and its own earlier tokens, and its positions continue from the
    context's end. Also, per group and continuation, the row positions whose outputs predict the
    continuation's tokens (the context's last token predicts the first one).
    """
    width = max(g.width for g in groups)
    ids = torch.zeros(len(groups), width, dtype=torch.long)
    positions = torch.zeros(len(groups), width, dtype=torch.long)
    allowed = torch.zeros(len(groups), width, width, dtype=torch.bool)
    predictors: list[list[list[int]]] = []
    for b, group in enumerate(groups):
        n = len(group.context)
        ids[b, :n] = torch.tensor(group.context, dtype=torch.long)
        positions[b, :n] = torch.arange(n)
        allowed[b, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
        start, rows = n, []
        for cont in group.continuations:
            k = len(cont) - 1
            seg = slice(start, start + k)
            ids[b, seg] = torch.tensor(cont[:-1], dtype=torch.long)
            positions[b, seg] = torch.arange(n, n + k)
            allowed[b, seg, :n] = True
            allowed[b, seg, seg] = torch.ones(k, k, dtype=torch.bool).tril()
            rows.append([n - 1, *range(start, start + k)])
            start += k
        idle = torch.arange(start, width)
        allowed[b, idle, idle] = True  # padding attends to itself only; never read
        predictors.append(rows)
    return ids, positions, allowed, predictors


def compute(device: torch.device | str, dtype: str = "float32"):
    """The precision the decoder runs in: as it is (float32), or under bfloat16 autocast."""
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype != "bfloat16":
        raise ValueError(f"compute dtype must be float32 or bfloat16, not {dtype!r}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def packed_logprobs(model: nn.Module, groups: Sequence[Group], compute_dtype: str = "float32") -> list[list[float]]:
    """Summed log-probability of every continuation of every group, in one forward pass (the decoder in
    ``compute_dtype``, the LM head in float32)."""
    backbone, head = backbone_and_head(model)
    device = head.weight.device
    dtype = torch.bfloat16 if compute_dtype == "bfloat16" else head.weight.dtype
    ids, positions, allowed, predictors = pack(groups)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    with compute(device, compute_dtype):
        hidden = backbone(
            input_ids=ids.to(device),
            position_ids=positions.to(device),
            attention_mask=mask[:, None].to(device),
            use_cache=False,
        ).last_hidden_state
    batch_rows, rows, tokens, owners = [], [], [], []
    for b, (group, group_rows) in enumerate(zip(groups, predictors)):
        for c, (cont, predict) in enumerate(zip(group.continuations, group_rows)):
            batch_rows += [b] * len(cont)
            rows += predict
            tokens += cont
            owners += [(b, c)] * len(cont)
    picked = hidden[torch.tensor(batch_rows, device=device), torch.tensor(rows, device=device)].float()
    logprobs = torch.log_softmax(nn.functional.linear(picked, head.weight.float()), dim=-1)
    values = logprobs.gather(1, torch.tensor(tokens, device=device)[:, None])[:, 0].double().cpu().tolist()
    out = [[0.0] * len(g.continuations) for g in groups]
    for (b, c), value in zip(owners, values):
        out[b][c] += value
    return out


@torch.inference_mode()
def loglikelihoods(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], progress=None,
                   chat: bool = False, compute_dtype: str = "float32") -> list[float]:  # fmt: skip
    """log P(continuation | context) for each (context, continuation) pair (``chat``: chat pairs).

    ``progress``, if given, is called with the number of pairs scored after each batch.
    """
    # As lm-eval: the model reads at most its max_position_embeddings tokens; the context is cut from the left.
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or MAX_LENGTH
    encoded = []
    for context, continuation in pairs:
        ctx, cont = encode_pair(tokenizer, context, continuation, chat)
        if not cont:
            raise ValueError(f"continuation {continuation!r} encodes to no token")
        encoded.append((ctx[max(0, len(ctx) + len(cont) - limit - 1) :], cont))
    groups, where = group_pairs(encoded)
    order = sorted(range(len(groups)), key=lambda g: -groups[g].width)
    scores: list[list[float]] = [[] for _ in groups]
    was_training = model.training
    model.eval()
    try:
        start = 0
        while start < len(order):
            size = max(1, BATCH_TOKENS // groups[order[start]].width)
            chunk = order[start : start + size]
            for g, values in zip(chunk, packed_logprobs(model, [groups[g] for g in chunk], compute_dtype)):
                scores[g] = values
            start += len(chunk)
            if progress is not None:
                progress(sum(len(groups[g].continuations) for g in chunk))
    finally:
        model.train(was_training)
    return [scores[g][c] for g, c in where]


@dataclass(frozen=True)
class Scores:
    acc: float
    acc_norm: float
    items: int
    correct: tuple[int, ...] = ()
    """1/0 per item for ``acc`` (for paired confidence intervals)."""
    correct_norm: tuple[int, ...] = ()
    """1/0 per item for ``acc_norm``."""


def score_items(model: nn.Module, tokenizer, items: Sequence[Item], progress=None,
                compute_dtype: str = "float32") -> Scores:  # fmt: skip
    """lm-eval's acc and acc_norm of ``model`` on multiple-choice ``items`` (all chat or all plain)."""
    pairs = [(c, x) for item in items for c, x in zip(item.contexts, item.continuations)]
    lls = loglikelihoods(model, tokenizer, pairs, progress, chat=bool(items) and items[0].chat,
                         compute_dtype=compute_dtype)  # fmt: skip
    correct, correct_norm = [], []
    pos = 0
    for item in items:
        ll = lls[pos : pos + len(item.continuations)]
        pos += len(item.continuations)
        correct.append(int(_argmax(ll) == item.gold))
        correct_norm.append(int(_argmax([v / n for v, n in zip(ll, item.choice_lengths)]) == item.gold))
    return Scores(acc=sum(correct) / len(items), acc_norm=sum(correct_norm) / len(items), items=len(items),
                  correct=tuple(correct), correct_norm=tuple(correct_norm))  # fmt: skip


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first of equal maxima, as numpy's argmax (lm-eval's)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))
