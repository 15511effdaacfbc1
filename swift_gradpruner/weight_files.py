"""Which weight files ``from_pretrained`` reads from a local checkpoint folder, and how many bytes they hold.

A folder often holds more than the weights transformers loads: ``pytorch_model.bin`` beside
``model.safetensors``, Mistral's ``consolidated.safetensors`` beside the Hugging Face shards, a trainer's
``optimizer.pt`` and ``training_args.bin``. Summing every weight-like file counted a 70B model two or
three times and sent it to the CPU (devices.py sizes the prune step from ``loaded_weight_bytes``).

The order is transformers' own, read in ``modeling_utils._get_resolved_checkpoint_files`` (5.19) for a
local folder with ``use_safetensors=None`` and no variant: ``config.json``'s ``transformers_weights``
when set, else the first of ``model.safetensors``, ``model.safetensors.index.json``,
``pytorch_model.bin``, ``pytorch_model.bin.index.json`` that exists. Safetensors always wins over .bin,
and a single ``model.safetensors`` wins over a safetensors index beside it. An index stands for the shards
of its ``weight_map``, unique and sorted (``utils.hub.get_checkpoint_shard_files``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PREFERENCE = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
"""transformers' local-folder order (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)."""


def chosen_file(model_dir: str | os.PathLike) -> Path | None:
    """The one file ``from_pretrained`` opens first (a weights file or an index), or None when there is none."""
    model_dir = Path(model_dir)
    config = model_dir / "config.json"
    explicit = json.loads(config.read_text()).get("transformers_weights") if config.is_file() else None
    if isinstance(explicit, str) and explicit:
        return model_dir / explicit
    return next((model_dir / name for name in PREFERENCE if (model_dir / name).is_file()), None)


def loaded_weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """The files ``from_pretrained`` reads the weights from: an index's shards (unique, sorted) or the one
    file; empty when the folder has none that transformers would load."""
    chosen = chosen_file(model_dir)
    if chosen is None:
        return []
    if not chosen.name.endswith(".index.json"):
        return [chosen]
    weight_map = json.loads(chosen.read_text())["weight_map"]
    return [chosen.parent / name for name in sorted(set(weight_map.values()))]


def loaded_weight_bytes(model_dir: str | os.PathLike) -> int:
    """Bytes of tensor data ``from_pretrained`` loads: an index's ``metadata.total_size`` when it has one,
    else the sum over ``loaded_weight_files`` of each safetensors file's data (its size less the 8-byte
    length and the JSON header) or of a .bin file's size (a zip of the raw storages and a small pickle)."""
    chosen = chosen_file(model_dir)
    if chosen is not None and chosen.name.endswith(".index.json"):
        total = json.loads(chosen.read_text()).get("metadata", {}).get("total_size")
        if isinstance(total, int | float) and total > 0:
            return int(total)
    return sum(_data_bytes(path) for path in loaded_weight_files(model_dir))


def _data_bytes(path: Path) -> int:
    """A safetensors file's tensor bytes (without its header), or any other file's size."""
    size = path.stat().st_size
    if not path.name.endswith(".safetensors") or size < 8:
        return size
    with path.open("rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return size - 8 - header if 8 + header <= size else size
