"""Rows of the user's own training data for the quality guard and the removal criteria.

The guard rows are held out of phase 1 (a fixed, seeded choice of rows taken out of the training
set before phase 1 trains), so the guard compares dense and pruned model on rows the LoRA probe
never fitted; phase 2 trains on every row again. The calibration rows (for skip_loss,
block_influence, angular) are ordinary training rows. Both are encoded with swift's own template,
exactly as training encodes them (prompt tokens carry label -100).

The measures run the text decoder alone on ``input_ids`` (measures.py): an image, video or audio row would
be measured with the same placeholder embeddings for every image, not what the model sees in training.
So guard rows with media are refused (``MediaRowsError``, when they are held out, before phase 1 trains),
calibration rows with media are passed over, and any encoded row that carries media inputs is refused.

Padding is done here rather than by swift's ``template.data_collator``: for a right-padding template
without packing they give the same batches (tests/test_holdout.py), but the collator follows the run's
``--padding_free``/``--packing`` (one packed row with position_ids) and ``--padding_side left``, which
the measures' plain forward pass cannot take. ``hold_out`` is not ``datasets.Dataset.train_test_split``
either: that shuffles the remaining training rows (phase 1 would train them in another order than the
user's, which matters with --dataset_shuffle false / --train_dataloader_shuffle false) and, without
keep_in_memory, writes index files into the dataset's cache.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import torch

from ..config import GradPruneConfigError

logger = logging.getLogger(__name__)
MEDIA_COLUMNS = ("images", "videos", "audios")
"""A swift dataset row's media (lists of files, URLs or bytes)."""
MEDIA_INPUTS = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "input_features",
                "image_sizes")  # fmt: skip
"""What swift's multimodal templates add to an encoded row for images, videos and audio."""
MEDIA_FIX = (
    "GradPruner measures the text decoder alone, which would see the same placeholder embeddings for every image; "
    "train on text rows, or turn off what measures rows: --gradprune_guard_rows 0 and an IGIA criterion "
    "(--gradprune_score squared; it reads phase 1's gradients, which do see the images)"
)


class MediaRowsError(GradPruneConfigError):
    """A row that the guard or a criterion would measure has images, video or audio."""


def has_media(row: dict) -> bool:
    """Whether a dataset row has any image, video or audio."""
    return any(row.get(column) for column in MEDIA_COLUMNS)


def hold_out(dataset, rows: int, seed: int):
    """(the dataset without ``rows`` held-out rows, those rows); (dataset, None) when not possible.

    Only an in-memory ``datasets.Dataset`` with at least ``4 * rows`` rows is split; a streaming or
    smaller dataset runs without a guard (the caller logs why). Held-out rows with media: MediaRowsError.
    """
    from datasets import Dataset

    if rows <= 0 or not isinstance(dataset, Dataset) or len(dataset) < 4 * rows:
        return dataset, None
    picked = set(random.Random(seed).sample(range(len(dataset)), rows))
    rest = [i for i in range(len(dataset)) if i not in picked]
    held = dataset.select(sorted(picked))
    media = [i for i, row in zip(sorted(picked), held) if has_media(row)]
    if media:
        raise MediaRowsError(f"the quality guard's held-out rows include {len(media)} with images, video or audio "
                             f"(training row {media[0]}, ...); {MEDIA_FIX}")  # fmt: skip
    return dataset.select(rest), held


def first_rows(dataset, count: int, seed: int) -> list[dict]:
    """``count`` text rows of an in-memory dataset in a seeded random order (all of them if fewer); rows with
    images, video or audio are passed over (``has_media``; among the first ``16 * count`` rows of that order,
    so that a dataset of images is not read through)."""
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    rows, media = [], 0
    for i in order[: 16 * count]:
        if len(rows) == count:
            break
        row = dataset[i]
        if has_media(row):
            media += 1
        else:
            rows.append(row)
    if media:
        logger.warning(f"[GradPruner] {media} training rows with images, video or audio passed over as calibration "
                       f"rows ({len(rows)} text rows taken): the criteria measure the text decoder alone")  # fmt: skip
    return rows


def encode_batches(template, rows: Sequence[dict], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Rows encoded by swift's template and right-padded into batches of input_ids / attention_mask /
    labels. Rows the template cannot encode (e.g. too long for --max_length) or without any trained
    token are skipped, as swift's training data loader skips them; a row with media is refused."""
    encoded = []
    for row in rows:
        if has_media(row):
            raise MediaRowsError(f"a row to measure has images, video or audio; {MEDIA_FIX}")
        try:
            out = template.encode(row)
        except Exception as error:  # swift raises various errors for rows it drops (MaxLengthError, ...)
            logger.debug(f"GradPruner: skipping a row the template cannot encode: {error}")
            continue
        media = [key for key in MEDIA_INPUTS if out.get(key) is not None]
        if media:
            raise MediaRowsError(f"a row to measure encodes to media inputs ({', '.join(media)}); {MEDIA_FIX}")
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
