"""Rows of the user's own training data for the quality guard and the removal criteria.

The guard rows are held out of phase 1 (a fixed, seeded choice of rows taken out of the training
set before phase 1 trains), so the guard compares dense and pruned model on rows the LoRA probe
never fitted; phase 2 trains on every row again. The calibration rows (for skip_loss,
block_influence, angular) are ordinary training rows. Both are encoded with swift's own template,
exactly as training encodes them (prompt tokens carry label -100).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)


def hold_out(dataset, rows: int, seed: int):
    """(the dataset without ``rows`` held-out rows, those rows); (dataset, None) when not possible.

    Only an in-memory ``datasets.Dataset`` with at least ``4 * rows`` rows is split; a streaming or
    smaller dataset runs without a guard (the caller logs why).
    """
    from datasets import Dataset

    if rows <= 0 or not isinstance(dataset, Dataset) or len(dataset) < 4 * rows:
        return dataset, None
    picked = set(random.Random(seed).sample(range(len(dataset)), rows))
    rest = [i for i in range(len(dataset)) if i not in picked]
    return dataset.select(rest), dataset.select(sorted(picked))


def first_rows(dataset, count: int, seed: int) -> list[dict]:
    """``count`` rows of an in-memory dataset in a seeded random order (all of them if fewer)."""
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    return [dataset[i] for i in order[:count]]


def encode_batches(template, rows: Sequence[dict], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Rows encoded by swift's template and right-padded into batches of input_ids / attention_mask /
    labels. Rows the template cannot encode (e.g. too long for --max_length) or without any trained
    token are skipped, as swift's training data loader skips them."""
    encoded = []
    for row in rows:
        try:
            out = template.encode(row)
        except Exception as error:  # swift raises various errors for rows it drops (MaxLengthError, ...)
            logger.debug(f"GradPruner: skipping a row the template cannot encode: {error}")
            continue
        labels = out.get("labels")
        if labels is None or all(label == -100 for label in labels[1:]):
            continue
        encoded.append((list(out["input_ids"]), list(labels)))
    pad = template.tokenizer.pad_token_id
    pad = pad if pad is not None else 0
    batches = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention_mask = torch.zeros(len(chunk), width, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for b, (ids, labs) in enumerate(chunk):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            attention_mask[b, : len(ids)] = 1
            labels[b, : len(labs)] = torch.tensor(labs)
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return batches


BATCHES_FILE = "batches.safetensors"


def save_batches(path, groups: dict[str, list[dict[str, torch.Tensor]]]) -> None:
    """Named lists of batches in one safetensors file (keys ``group/index/field``)."""
    from safetensors.torch import save_file

    tensors = {f"{group}/{i}/{field}": value.contiguous() for group, batches in groups.items()
               for i, batch in enumerate(batches) for field, value in batch.items()}  # fmt: skip
    save_file(tensors, str(path), metadata={"groups": ",".join(groups)})


def load_batches(path) -> dict[str, list[dict[str, torch.Tensor]]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {g: {} for g in handle.metadata()["groups"].split(",")}
        names = handle.keys()  # a safe_open handle is not iterable
        for key in names:
            group, index, field = key.split("/")
            groups[group].setdefault(int(index), {})[field] = handle.get_tensor(key)
    return {group: [batches[i] for i in sorted(batches)] for group, batches in groups.items()}
