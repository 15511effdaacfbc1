"""One task's rows for ``gradprune eval`` and what the cells of that task share (the phase-1 probe,
the criteria's measurements, the dense model's predictions on the guard rows)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass
from typing import Any

import torch

from ..damage import DenseTargets
from ..importance import IGIAAccumulator
from ..measures import reference_of
from .finetune import Recipe, batches, collate, encode_examples, lora_finetune
from .tasks import Item, load_task


@dataclass(frozen=True)
class Sizes:
    train_rows: int = 256
    """Training rows per task (recovery fine-tune, phase-1 probe, calibration)."""
    eval_items: int = 100
    """Items of the val split per task."""
    test_items: int = 200
    """Items of the test split per task (more: it is read once, for the final table)."""
    calibration_rows: int = 16
    """Calibration rows of a method that does not set its own (``calibration_rows=``)."""
    guard_rows: int = 32
    """Training rows held out of every fine-tune, for the quality guard's loss (as in a swift run)."""
    chat: bool = True
    """Rows in chat form (swift's chatml template; tasks.to_chat), as a swift user's data are; False:
    lm-eval's plain prompts."""


@dataclass
class TaskData:
    name: str
    train: list[Item]
    splits: dict[str, list[Item]]
    """Evaluated items per split (the reported one, and any sealed one)."""
    guard: list[Item]
    """Training rows no fine-tune sees, for the quality guard."""
    chat: bool = False

    @classmethod
    def load(cls, task: str, splits: Sequence[str], sizes: Sizes) -> TaskData:
        rows = load_task(task, "train", sizes.train_rows + sizes.guard_rows, chat=sizes.chat)
        train = min(sizes.train_rows, len(rows) - sizes.guard_rows)
        evaluated = {name: load_task(task, name, sizes.test_items if name == "test" else sizes.eval_items,
                                     chat=sizes.chat) for name in splits}  # fmt: skip
        return cls(task, rows[:train], evaluated, rows[train : train + sizes.guard_rows], sizes.chat)

    @property
    def examples(self) -> list[tuple[str, str]]:
        return [item.answer for item in self.train]

    def identity(self, split: str) -> dict[str, dict[str, Any]]:
        """What a cell of ``split`` trains and is scored on: count and content hash of the training rows,
        the guard rows and the split's items (a change of the task split, its sizes or formatting shows)."""
        return {"train": _fingerprint(self.train), "guard": _fingerprint(self.guard),
                "evaluated": _fingerprint(self.splits[split])}  # fmt: skip


def _fingerprint(items: Sequence[Item]) -> dict[str, Any]:
    text = json.dumps([astuple(item) for item in items], ensure_ascii=False)
    return {"rows": len(items), "sha256": hashlib.sha256(text.encode()).hexdigest()[:16]}


class TaskCache:
    """What several cells of one task share: the phase-1 probe's accumulators, the criteria's
    measurements, the guard batches and the dense model's predictions on them."""

    def __init__(self, data: TaskData, load: Callable[[], torch.nn.Module], tokenizer, recipe: Recipe, sizes: Sizes):
        self.data, self.load, self.tokenizer, self.recipe, self.sizes = data, load, tokenizer, recipe, sizes
        self.probes: dict[int, IGIAAccumulator] = {}
        self.criteria: dict[int, dict] = {}
        """Removal-criterion measurements on the unpruned model, per calibration size, shared by the budgets."""
        self.guards = {
            split: guard_batches(tokenizer, items, recipe, data.chat) for split, items in data.splits.items()
        }
        self.guard = guard_batches(tokenizer, data.guard, recipe, data.chat)
        self.dense_guard_loss: float | None = None
        self._dense_guard: list[DenseTargets] | None = None

    def dense_guard(self) -> list[DenseTargets]:
        """The dense model's predictions on the guard rows (for the KL of a pruned model)."""
        if self._dense_guard is None:
            self._dense_guard = reference_of(self.load(), self.guard)
        return self._dense_guard

    def calibration(self, rows: int | None = None) -> list[dict[str, torch.Tensor]]:
        """Batches of the first ``rows`` training rows in the fine-tune's shuffled order."""
        size = self.recipe.batch_size
        count = math.ceil((rows or self.sizes.calibration_rows) / size)
        return batches(self.tokenizer, self.data.examples, size, self.recipe.max_length, count, self.recipe.seed,
                       self.data.chat)  # fmt: skip

    def probe(self, steps: Sequence[int]) -> dict[int, IGIAAccumulator]:
        """Accumulators of GradPruner's phase 1 for each step count: the LoRA fine-tune of the dense
        model (the recovery recipe at its full learning rate after warm-up, as at the start of a long
        run) with the product's gradient capture after every backward pass."""
        from ..capture import lora_pairs, read_lora_grads

        missing = sorted(set(steps) - set(self.probes))
        if missing:
            fresh = {t: IGIAAccumulator() for t in missing}
            done = [0]

            def capture(peft_model) -> None:
                grads = read_lora_grads(lora_pairs(peft_model))
                done[0] += 1
                for t, accumulator in fresh.items():
                    if done[0] <= t:
                        accumulator.update(grads)

            lora_finetune(
                self.load(), self.tokenizer, self.data.examples, self.recipe,
                steps=max(missing), constant_after_warmup=True, on_backward=capture, chat=self.data.chat,
            )  # fmt: skip
            self.probes.update(fresh)
        return {t: self.probes[t] for t in steps}


def guard_batches(
    tokenizer, items: Sequence[Item], recipe: Recipe, chat: bool = False
) -> list[dict[str, torch.Tensor]]:
    """The items' right answers as loss batches (answer tokens only)."""
    encoded = encode_examples(tokenizer, [item.answer for item in items], recipe.max_length, chat)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    size = recipe.batch_size
    return [collate(encoded[i : i + size], pad) for i in range(0, len(encoded), size)]
