"""Reading and writing safetensors checkpoints by the tensor, for the streaming surgery (streaming.py):
where each tensor is, its size from the file header, and new shards planned by huggingface_hub as
``save_pretrained`` plans them (``split_state_dict_into_shards_factory``), with save_pretrained's index.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from huggingface_hub import split_state_dict_into_shards_factory

INDEX_NAME = "model.safetensors.index.json"


def weight_files(model_dir: str | os.PathLike) -> dict[str, Path]:
    """Each tensor name of a safetensors checkpoint with the shard file holding it."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: model_dir / name for key, name in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{model_dir} has no model.safetensors or {INDEX_NAME}")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def read_tensors(files: Mapping[str, Path], keys: list[str]) -> dict[str, torch.Tensor]:
    """The tensors ``keys``, each file opened (memory-mapped) only while it is read."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for key in keys:
        by_file.setdefault(files[key], []).append(key)
    out = {}
    for path, names in by_file.items():
        with safe_open(path, framework="pt") as f:
            for name in names:
                out[name] = f.get_tensor(name)
    return {key: out[key] for key in keys}


class ShardWriter:
    """Writes tensors, as they come, to the shards huggingface_hub planned from their sizes (``sizes``, in the
    order they will come) as ``save_pretrained`` plans them; each shard is written once it is complete."""

    def __init__(self, folder: Path, sizes: Mapping[str, int], max_bytes: int) -> None:
        self.folder = folder
        self.plan = split_state_dict_into_shards_factory(dict(sizes), get_storage_size=int, max_shard_size=max_bytes,
                                                         filename_pattern="model{suffix}.safetensors")  # fmt: skip
        self.waiting = dict(self.plan.filename_to_tensors)
        self.buffer: dict[str, torch.Tensor] = {}

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.buffer.update(tensors)
        for name, keys in list(self.waiting.items()):
            if all(key in self.buffer for key in keys):
                save_shard(self.folder / name, {key: self.buffer.pop(key) for key in keys})
                del self.waiting[name]

    def close(self) -> None:
        if self.waiting or self.buffer:
            raise ValueError(f"tensors planned but not written: {sorted(k for v in self.waiting.values() for k in v)}")
        if self.plan.is_sharded:
            write_index(self.folder, self.plan.tensor_to_filename, self.plan.metadata["total_size"])


def append_shards(folder: Path, sizes: Mapping[str, int], read: Callable[[list[str]], Mapping[str, torch.Tensor]],
                  max_shard_bytes: int | str) -> None:  # fmt: skip
    """Add tensors (``sizes``: name -> bytes, in order; ``read(names)`` gives them) to the safetensors checkpoint in
    ``folder`` as new shards after its own, planned as save_pretrained plans them; then every shard is named
    ``model-0000i-of-0000n.safetensors`` and the index is rewritten."""
    saved = weight_files(folder)
    shards = [(path, [key for key, p in saved.items() if p == path]) for path in sorted(set(saved.values()))]
    plan = split_state_dict_into_shards_factory(dict(sizes), get_storage_size=int, filename_pattern=".new{suffix}.tmp",
                                                max_shard_size=max_shard_bytes)  # fmt: skip
    for name, keys in plan.filename_to_tensors.items():
        save_shard(folder / name, read(keys))
        shards.append((folder / name, keys))
    _rename_shards(folder, shards)


def _rename_shards(folder: Path, shards: list[tuple[Path, list[str]]]) -> None:
    """Name ``shards`` (files in ``folder`` with their tensor names, in order) as save_pretrained names n shards,
    and write their index."""
    count = len(shards)
    temporary = [path.rename(path.with_name(f".shard-{i}.tmp")) for i, (path, _) in enumerate(shards)]
    weight_map = {}
    for number, (path, (_, keys)) in enumerate(zip(temporary, shards), start=1):
        name = f"model-{number:05d}-of-{count:05d}.safetensors"
        path.rename(folder / name)
        weight_map.update(dict.fromkeys(keys, name))
    sizes = tensor_sizes({key: folder / name for key, name in weight_map.items()}, list(weight_map))
    write_index(folder, weight_map, sum(sizes.values()))


def write_index(folder: Path, weight_map: Mapping[str, str], total_size: int) -> None:
    """model.safetensors.index.json as save_pretrained writes it."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(weight_map)}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_shard(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({key: tensor.contiguous() for key, tensor in tensors.items()}, str(path), metadata={"format": "pt"})


def tensor_sizes(files: Mapping[str, Path], keys: list[str]) -> dict[str, int]:
    """Bytes of each tensor ``keys``, from the safetensors headers (8-byte length, then JSON with each
    tensor's ``data_offsets``), without reading any tensor."""
    headers: dict[Path, dict] = {}
    for key in keys:
        if files[key] not in headers:
            with open(files[key], "rb") as f:
                headers[files[key]] = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return {key: headers[files[key]][key]["data_offsets"][1] - headers[files[key]][key]["data_offsets"][0]
            for key in keys}  # fmt: skip
