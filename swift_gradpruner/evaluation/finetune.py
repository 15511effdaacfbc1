"""The recovery fine-tune every model of the harness gets: LoRA on a task's train split, loss on the
answer tokens only, one fixed recipe for all (the same trainer path for dense and pruned models).

Each example is an (context, continuation) pair encoded as the scorer encodes it, so the model is
trained on exactly the text that evaluation scores. ``on_backward`` is called after each backward
pass (gradients accumulated, not yet clipped) with the peft model: GradPruner's phase-1 capture
reads the LoRA gradients there, with the product's own ``capture.read_lora_grads``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..measures import answer_loss
from .scoring import compute, encode_pair


@dataclass(frozen=True)
class Recipe:
    """LoRA recipe of the recovery fine-tune (and of GradPruner's phase-1 probe)."""

    lora_rank: int = 8
    lora_alpha: int = 32
    learning_rate: float = 3e-4
    batch_size: int = 8
    epochs: float = 1.0
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_length: int = 384
    seed: int = 0
    compute_dtype: str = "float32"
    """float32, or bfloat16: the decoder's forward/backward (and the scorer's) under bfloat16 autocast,
    as a GPU run with --torch_dtype bfloat16 trains; weights and optimizer stay float32."""

    def to_dict(self) -> dict:
        return asdict(self)


def encode_examples(tokenizer, examples: Sequence[tuple[str, str]], max_length: int,
                    chat: bool = False) -> list[tuple[list[int], int]]:  # fmt: skip
    """(token ids, number of answer tokens at the end) per example, the context cut from the left."""
    out = []
    for context, continuation in examples:
        ctx, cont = encode_pair(tokenizer, context, continuation, chat)
        cont = cont[:max_length]
        out.append(((ctx + cont)[-max_length:], len(cont)))
    return out


def collate(rows: Sequence[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels (-100 everywhere but the answer tokens)."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for b, (ids, answer) in enumerate(rows):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        attention_mask[b, : len(ids)] = 1
        labels[b, len(ids) - answer : len(ids)] = torch.tensor(ids[len(ids) - answer :])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batches(tokenizer, examples: Sequence[tuple[str, str]], batch_size: int, max_length: int,
            count: int, seed: int, chat: bool = False) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    """``count`` training batches over epochs of the examples, each epoch shuffled with ``seed`` + epoch.

    Within each window of 8 batches the rows are grouped by length (as the HF Trainer's
    ``group_by_length``), which cuts padding, then the window's batches are shuffled.
    """
    encoded = encode_examples(tokenizer, examples, max_length, chat)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[dict[str, torch.Tensor]] = []
    epoch = 0
    while len(out) < count:
        rng = random.Random(seed + epoch)
        order = list(range(len(encoded)))
        rng.shuffle(order)
        window = 8 * batch_size
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: len(encoded[i][0]))
            group = [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
            rng.shuffle(group)
            out += [collate([encoded[i] for i in rows], pad) for rows in group]
        epoch += 1
    return out[:count]


def steps_for(examples: int, recipe: Recipe) -> int:
    return max(1, math.ceil(recipe.epochs * examples / recipe.batch_size))


def lora_finetune(
    model: nn.Module,
    tokenizer,
    examples: Sequence[tuple[str, str]],
    recipe: Recipe,
    *,
    steps: int | None = None,
    constant_after_warmup: bool = False,
    on_backward: Callable[[nn.Module], None] | None = None,
    progress: Callable[[int, float], None] | None = None,
    chat: bool = False,
    modules_to_save: Sequence[str] = (),
) -> nn.Module:
    """LoRA-train ``model`` (all linears of the decoder) on ``examples`` and return it with the LoRA
    weights merged (a plain model again). ``modules_to_save`` (module names) are trained in full instead,
    as peft's (and swift's) ``modules_to_save`` do.

    ``steps`` defaults to ``recipe.epochs`` passes over the examples. The learning rate warms up
    linearly over ``warmup_ratio`` of the steps, then decays linearly to 0 (or stays constant with
    ``constant_after_warmup``, for a probe that stands for the first steps of a long run).
    """
    from peft import LoraConfig, get_peft_model

    total = steps if steps is not None else steps_for(len(examples), recipe)
    torch.manual_seed(recipe.seed)
    lora = LoraConfig(r=recipe.lora_rank, lora_alpha=recipe.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                      modules_to_save=list(modules_to_save) or None)  # fmt: skip
    peft_model = get_peft_model(model, lora)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=0.0)
    warmup = max(1, round(recipe.warmup_ratio * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if constant_after_warmup:
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    data = batches(tokenizer, examples, recipe.batch_size, recipe.max_length, total, recipe.seed, chat)
    peft_model.train()
    for step, batch in enumerate(data):
        with compute(next(peft_model.parameters()).device, recipe.compute_dtype):
            loss = answer_loss(peft_model, batch)
        loss.backward()
        if on_backward is not None:
            on_backward(peft_model)
        torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if progress is not None:
            progress(step + 1, loss.item())
    peft_model.eval()
    return peft_model.merge_and_unload()
