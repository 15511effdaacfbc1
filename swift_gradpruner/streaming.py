"""Layer surgery on the checkpoint files, one decoder layer at a time: for models too big to load.

The in-memory path (prune.py) loads the whole model (140 GB for a 70B model in bf16). Here the
safetensors shards are read lazily (``safe_open``) one group at a time - one tensor outside the
decoder layers, or one kept decoder layer plus, for a merge target, the linears of the layers merged
into it - the merge (Eq. 5, ``merge.merge_into``, the same code as in memory) is applied, the keys
of kept layers are renumbered 0..L'-1, and the tensors go to new shards (at most ``max_shard_bytes``
each, or one layer when a layer is bigger) with an index. Peak host memory is about one shard.
Config and the other files (tokenizer, generation config, chat template) follow; the result is the
same checkpoint the in-memory path writes (tested bit for bit).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from .architecture import LAYERS_PREFIX, text_config
from .config import GradPruneConfig
from .layer_config import check_removal, prune_config
from .merge import merge_into, merge_targets
from .selection import LayerPlan
from .surgery import atomic_dir

INDEX_NAME = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth")


def _layer_key(prefix: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(prefix)}(\d+)\.(.+)$")


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


def stream_prune(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    plan: LayerPlan,
    igia: Callable[[str], torch.Tensor | None],
    config: GradPruneConfig,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = 2**30,
    prefix: str = LAYERS_PREFIX,
) -> tuple[Path, dict[int, dict[str, float]]]:
    """Write ``model_dir`` pruned by ``plan`` to ``out_dir`` atomically (``write_pruned``)."""
    with atomic_dir(out_dir, overwrite) as tmp:
        fractions = write_pruned(model_dir, tmp, plan, igia, config, max_shard_bytes=max_shard_bytes, prefix=prefix)
    return Path(out_dir), fractions


def write_pruned(
    model_dir: str | os.PathLike,
    folder: Path,
    plan: LayerPlan,
    igia: Callable[[str], torch.Tensor | None],
    config: GradPruneConfig,
    *,
    max_shard_bytes: int = 2**30,
    prefix: str = LAYERS_PREFIX,
) -> dict[int, dict[str, float]]:
    """Write the pruned checkpoint's files into the existing ``folder``; returns, per merged layer,
    the fraction of each linear's elements merged (as ``merge.merge_removed_layers``). ``prefix`` is the
    decoder layers' key prefix (``architecture.layers_prefix``; ``has_layer_keys`` checks the files use it)."""
    from transformers import AutoConfig

    files = weight_files(model_dir)
    new_index = {j: i for i, j in enumerate(plan.kept)}
    targets = merge_targets(plan)
    fractions: dict[int, dict[str, float]] = {}
    model_config = AutoConfig.from_pretrained(model_dir)
    num_layers = text_config(model_config).num_hidden_layers
    if num_layers != plan.num_layers:
        raise ValueError(f"the checkpoint has {num_layers} decoder layers; the plan has {plan.num_layers}")
    check_removal(model_config, list(plan.kept))
    prune_config(model_config, list(plan.kept))
    pattern = _layer_key(prefix)
    writer = _ShardWriter(folder, max_shard_bytes)
    for group in _groups(files, plan.num_layers, pattern):
        tensors = _read(files, group)
        layer = _layer_of(group[0], pattern)
        if layer is not None and layer in targets:
            merged, shares = _merge_layer(layer, tensors, targets[layer], files, igia, config, prefix)
            tensors.update(merged)
            fractions.update(shares)
        if layer is not None and layer not in new_index:
            continue  # a removed layer
        writer.add({_renumber(key, new_index, pattern): tensor for key, tensor in tensors.items()})
    writer.close()
    model_config.save_pretrained(folder)
    for path in Path(model_dir).iterdir():
        if path.is_file() and path.name != "config.json" and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(path, folder / path.name)
    return {source: fractions.get(source, {}) for source in plan.merged}


def has_layer_keys(model_dir: str | os.PathLike, prefix: str, num_layers: int) -> bool:
    """Whether the checkpoint's tensor names put exactly layers 0..num_layers-1 under ``prefix`` (a
    checkpoint in an older naming, which transformers renames while loading, is pruned in memory)."""
    pattern = _layer_key(prefix)
    return {_layer_of(key, pattern) for key in weight_files(model_dir)} - {None} == set(range(num_layers))


def _groups(files: Mapping[str, Path], num_layers: int, pattern: re.Pattern) -> Iterator[list[str]]:
    """Tensor names in the order they are processed: each non-layer tensor alone, then each layer's."""
    by_layer: dict[int, list[str]] = {}
    for key in files:
        layer = _layer_of(key, pattern)
        if layer is None:
            yield [key]
        else:
            by_layer.setdefault(layer, []).append(key)
    if set(by_layer) != set(range(num_layers)):
        raise ValueError(f"the checkpoint has {len(by_layer)} decoder layers; the plan has {num_layers}")
    for layer in sorted(by_layer):
        yield by_layer[layer]


def _merge_layer(target, tensors, sources, files, igia, config, layers_prefix):
    """The merged linear weights of ``target`` (keys as in the checkpoint) and the merged fractions."""
    prefix = f"{layers_prefix}{target}."
    weights = {key[len(prefix) : -len(".weight")]: t for key, t in tensors.items() if key.endswith(".weight")
               and t.dim() == 2}  # fmt: skip

    def source_weight(source: int, suffix: str) -> torch.Tensor | None:
        key = f"{layers_prefix}{source}.{suffix}.weight"
        return _read(files, [key])[key] if key in files else None

    merged, shares = merge_into(target, weights, sources, source_weight, igia, config, layers_prefix)
    return {f"{prefix}{suffix}.weight": weight for suffix, weight in merged.items()}, shares


def _read(files: Mapping[str, Path], keys: list[str]) -> dict[str, torch.Tensor]:
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


def _layer_of(key: str, pattern: re.Pattern) -> int | None:
    match = pattern.match(key)
    return int(match.group(1)) if match else None


def _renumber(key: str, new_index: Mapping[int, int], pattern: re.Pattern) -> str:
    match = pattern.match(key)
    if not match:
        return key
    return f"{key[: match.start(1)]}{new_index[int(match.group(1))]}.{match.group(2)}"


class _ShardWriter:
    """Buffers tensors up to ``max_bytes`` per shard, then names them like save_pretrained does."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.shards: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        size = _bytes(tensors)
        if self.buffer and _bytes(self.buffer) + size > self.max_bytes:
            self._flush()
        self.buffer.update(tensors)
        self.total += size

    def close(self) -> None:
        if self.buffer or not self.shards:
            self._flush()
        count = len(self.shards)
        if count == 1:
            self.shards[0][0].rename(self.folder / "model.safetensors")
            return
        weight_map = {}
        for number, (path, keys) in enumerate(self.shards, start=1):
            name = f"model-{number:05d}-of-{count:05d}.safetensors"
            path.rename(self.folder / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.folder / f".shard-{len(self.shards)}.tmp"
        save_file({k: v.contiguous() for k, v in self.buffer.items()}, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.buffer)))
        self.buffer = {}


def _bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
