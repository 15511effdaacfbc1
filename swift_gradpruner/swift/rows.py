"""The held-out rows of a run, and the saved state that carries them (and phase 1's gradients) to pruning.

The guard and calibration rows are the same whether phase 1 runs or not: swift loads the data with
the run's own ``--split_dataset_ratio`` (so phase 2's validation rows are never among them), a seeded
choice of ``guard_rows`` is held out, ``calibration_rows`` more are taken from the rest, and both are
encoded by swift's template exactly as training encodes them. Without phase 1 (no IGIA score, no
merge) this happens here, on rank 0, without loading the model: the run goes straight from the data to
the criterion.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from ..config import GradPruneConfig
from ..importance import IGIAAccumulator, save_state
from .holdout import BATCHES_FILE, encode_batches, first_rows, hold_out, save_batches
from .reuse import PHASE1_FILE

BUILDING_SUFFIX = ".building"


def split_off(train, config: GradPruneConfig, seed: int, log_warning) -> tuple[Any, Any]:
    """(training rows without the guard rows, the guard rows or None), as phase 1 and the data step do."""
    rows = config.guard_rows
    train, held_out = hold_out(train, rows, seed)
    if rows and held_out is None:
        log_warning(
            f"[GradPruner] quality guard off: it needs an in-memory training set of at least {4 * rows} rows "
            "(not streaming) to hold out --gradprune_guard_rows of them"
        )
    return train, held_out


def encode_rows(template, train, held_out, config: GradPruneConfig, batch: int, seed: int) -> dict[str, list]:
    """The guard and calibration batches (calibration rows are saved whatever the score, so a re-prune
    from the state may use any criterion)."""
    from datasets import Dataset

    guard = encode_batches(template, list(held_out), batch) if held_out is not None else []
    rows = first_rows(train, config.calibration_rows, seed) if isinstance(train, Dataset) else []
    return {"guard": guard, "calibration": encode_batches(template, rows, batch) if rows else []}


def write_state(state_dir: Path, info: dict, batches: dict[str, list], accumulator: IGIAAccumulator | None) -> None:
    """Write a complete state atomically: built beside ``state_dir``, then renamed over it."""
    building = state_dir.with_name(f".{state_dir.name}{BUILDING_SUFFIX}")
    building.mkdir(parents=True, exist_ok=True)
    if accumulator is not None:
        save_state(accumulator, building)
    save_batches(building / BATCHES_FILE, batches)
    (building / PHASE1_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    shutil.rmtree(state_dir, ignore_errors=True)
    building.rename(state_dir)


REPORTED = ("phase1", "source_model", "model_identity", "rows_key", "swift_settings", "versions", "data_digests")
"""What a state's phase1.json passes on to the pruned model's report (what it was made from)."""


def state_info(args, phase1_key: str | None, batches: dict[str, list], phase1: dict | None,
               material: dict[str, Any]) -> dict:  # fmt: skip
    """phase1.json: the keys (keys.py), what phase 1 did (None: it did not run), the source model and what
    made the state (``material``: model identity, swift settings, versions, the data's digests)."""
    from .keys import rows_key

    return {
        "phase1_key": phase1_key,
        "rows_key": rows_key(batches),
        "phase1": phase1,
        "contents": {"igia": phase1 is not None},
        "source_model": args.model_dir,
        "model_identity": material["model"],
        "swift_settings": material["swift"],
        "versions": material["versions"],
        "data_digests": material.get("data"),
        "swift_args": {"model_type": args.model_type, "template": args.template},
    }


def prepare_rows(args, config: GradPruneConfig, material: dict[str, Any], state_dir: Path) -> str:
    """Rank 0, without phase 1: load the data, hold out and encode the rows, save them as a state
    (no gradients). Returns the rows key (keys.rows_key)."""
    from swift.utils import get_logger

    start = time.perf_counter()
    logger = get_logger()
    logger.info("[GradPruner] no phase 1: neither the score nor a merge reads gradients; preparing the held-out rows")
    pipeline = _data_pipeline_class()(args)
    train, _ = pipeline._get_dataset()  # the user's own arguments: the user's split ratio
    train, held_out = split_off(train, config, args.data_seed, logger.warning)
    batches = encode_rows(pipeline.template, train, held_out, config, args.per_device_train_batch_size, args.data_seed)
    info = state_info(args, None, batches, None, material)
    write_state(state_dir, info, batches, None)
    logger.info(f"[GradPruner] {len(batches['guard'])} guard and {len(batches['calibration'])} calibration batches "
                f"ready in {time.perf_counter() - start:.1f} s (saved in {state_dir})")  # fmt: skip
    return info["rows_key"]


def _data_pipeline_class():
    from swift.pipelines import SwiftSft

    class GradPruneRows(SwiftSft):
        """SwiftSft with the tokenizer and template but no model: enough to load and encode rows."""

        def _prepare_model_tokenizer(self, **kwargs):
            self.model, self.processor = self.args.get_model_processor(load_model=False)

        def _prepare_generation_config(self):
            pass

    return GradPruneRows
