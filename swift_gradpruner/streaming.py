"""Layer surgery on the checkpoint files, one decoder layer at a time: for models too big to load.

The in-memory path (prune.py) loads the whole model (140 GB for a 70B model in bf16). Here the
safetensors shards are read lazily (``safe_open``) one group at a time - one tensor outside the
decoder layers, or one kept decoder layer plus, for a merge target, the linears of the layers merged
into it - the merge (Eq. 5, ``merge.merge_into``, the same code as in memory) is applied, the keys
of kept layers are renumbered 0..L'-1, and the tensors go to new shards with an index, planned by
huggingface_hub's ``split_state_dict_into_shards_factory`` as ``save_pretrained`` plans them (at most
``max_shard_bytes`` each, a bigger tensor alone). Peak host memory is about one shard. Config and the
other files (tokenizer, generation config, chat template) follow; the result is the same checkpoint
the in-memory path writes (tested bit for bit).

Multi-token-prediction (MTP) layers - DeepSeek-V3's and GLM-4.5's ``num_nextn_predict_layers``, stored
after the decoder layers at ``<prefix><num_hidden_layers + k>.`` - are kept, renumbered to follow the
kept layers, which is where vLLM's MTP speculative decoding looks for them (transformers' model has no
module for them: the in-memory path copies them from the base shards, ``append_mtp``). Qwen3-Next's
``mtp.*`` tensors do not depend on the layer count and are kept as they are.
"""

from __future__ import annotations

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
from .shards import INDEX_NAME, ShardWriter, append_shards, read_tensors, tensor_sizes, weight_files
from .surgery import atomic_dir

WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth")
DROPPED_FILES = ("params.json",)
"""Mistral's native-format config: it goes with ``consolidated.safetensors``, which a pruned checkpoint does
not have (it has Hugging Face weights and config.json), and says the dense ``n_layers``. vLLM reads it only
when ``consolidated*.safetensors`` exists or with ``--config-format mistral``; without it every loader
reads config.json."""
MTP_PREFIX = "mtp."
"""Qwen3-Next's multi-token-prediction tensors (numbered inside the MTP module, not after the decoder layers)."""


def _layer_key(prefix: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(prefix)}(\d+)\.(.+)$")


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
    targets = merge_targets(plan)
    fractions: dict[int, dict[str, float]] = {}
    model_config = AutoConfig.from_pretrained(model_dir)
    num_layers = text_config(model_config).num_hidden_layers
    if num_layers != plan.num_layers:
        raise ValueError(f"the checkpoint has {num_layers} decoder layers; the plan has {plan.num_layers}")
    check_removal(model_config, list(plan.kept))
    prune_config(model_config, list(plan.kept))
    pattern = _layer_key(prefix)
    mtp = _mtp_layers(files, pattern, num_layers, mtp_count(model_config))
    new_index = {j: i for i, j in enumerate([*plan.kept, *mtp])}  # MTP layers follow the kept layers
    groups = [
        group
        for group in _groups(files, num_layers + len(mtp), pattern)
        if _layer_of(group[0], pattern) in (None, *new_index)
    ]  # fmt: skip  (removed layers are not written)
    sizes = tensor_sizes(files, list(files))
    shards = ShardWriter(folder, {_renumber(key, new_index, pattern): sizes[key] for group in groups for key in group},
                     max_shard_bytes)  # fmt: skip
    for group in groups:
        tensors = read_tensors(files, group)
        layer = _layer_of(group[0], pattern)
        if layer is not None and layer in targets:
            merged, shares = _merge_layer(layer, tensors, targets[layer], files, igia, config, prefix)
            tensors.update(merged)
            fractions.update(shares)
        shards.add({_renumber(key, new_index, pattern): tensor for key, tensor in tensors.items()})
    shards.close()
    model_config.save_pretrained(folder)
    for path in carried_files(model_dir):
        shutil.copy2(path, folder / path.name)
    return {source: fractions.get(source, {}) for source in plan.merged}


def carried_files(model_dir: str | os.PathLike) -> list[Path]:
    """The base checkpoint's files that the pruned one takes unchanged: all but config.json, the weights and
    ``DROPPED_FILES`` (tokenizer, generation config, chat template, a processor's files, ...)."""
    return [path for path in sorted(Path(model_dir).iterdir()) if path.is_file() and path.name != "config.json"
            and path.name not in DROPPED_FILES and not path.name.endswith(WEIGHT_SUFFIXES)]  # fmt: skip


def mtp_count(model_config) -> int:
    """Multi-token-prediction layers the config announces (``num_nextn_predict_layers``; 0 if none)."""
    return int(getattr(text_config(model_config), "num_nextn_predict_layers", None) or 0)


def has_mtp(model_dir: str | os.PathLike) -> bool:
    """Whether a safetensors checkpoint's config announces MTP layers or its files hold ``mtp.*`` tensors."""
    from transformers import AutoConfig

    folder = Path(model_dir)
    if not ((folder / "model.safetensors").is_file() or (folder / INDEX_NAME).is_file()):
        return False
    return mtp_count(AutoConfig.from_pretrained(folder)) > 0 or any(
        k.startswith(MTP_PREFIX) for k in weight_files(folder)
    )


def has_layer_keys(model_dir: str | os.PathLike, prefix: str, num_layers: int, mtp: int = 0) -> bool:
    """Whether the checkpoint's tensor names put exactly layers 0..num_layers-1 under ``prefix``, followed by
    at most ``mtp`` MTP layers (a checkpoint in an older naming, which transformers renames while loading,
    is pruned in memory)."""
    pattern = _layer_key(prefix)
    files = weight_files(model_dir)
    try:
        _mtp_layers(files, pattern, num_layers, mtp)
    except ValueError:
        return False
    return set(range(num_layers)) <= {_layer_of(key, pattern) for key in files}


def append_mtp(model_dir: str | os.PathLike, folder: Path, prefix: str, max_shard_bytes: int | str = "50GB") -> None:
    """Copy the base checkpoint's MTP tensors into the pruned checkpoint ``folder`` (written by
    ``save_pretrained``, whose model has no MTP module): MTP layers renumbered to follow the pruned
    config's decoder layers, ``mtp.*`` as they are. The new shards come after the saved ones, all are
    renamed ``model-0000i-of-0000n.safetensors`` and the index is rewritten. Nothing happens without any."""
    from transformers import AutoConfig

    files, pattern = weight_files(model_dir), _layer_key(prefix)
    base = AutoConfig.from_pretrained(model_dir)
    num_layers = text_config(base).num_hidden_layers
    mtp = _mtp_layers(files, pattern, num_layers, mtp_count(base))
    kept = text_config(AutoConfig.from_pretrained(folder)).num_hidden_layers
    new_index = {j: kept + k for k, j in enumerate(mtp)}
    keys = [key for key in files if key.startswith(MTP_PREFIX) or _layer_of(key, pattern) in new_index]
    if not keys:
        return
    names = {key: _renumber(key, new_index, pattern) for key in keys}
    source = {new: old for old, new in names.items()}

    def read(new_names: list[str]) -> dict[str, torch.Tensor]:
        tensors = read_tensors(files, [source[name] for name in new_names])
        return {name: tensors[source[name]] for name in new_names}

    sizes = tensor_sizes(files, keys)
    append_shards(folder, {names[key]: sizes[key] for key in keys}, read, max_shard_bytes)


def _mtp_layers(files: Mapping[str, Path], pattern: re.Pattern, num_layers: int, announced: int) -> list[int]:
    """The MTP layers present after the decoder layers (num_layers, num_layers+1, ...; none or as many as
    ``announced``); a ValueError for any other layer beyond the decoder layers."""
    extra = sorted({_layer_of(key, pattern) for key in files} - {None} - set(range(num_layers)))
    if extra and (extra != list(range(num_layers, num_layers + len(extra))) or len(extra) > announced):
        raise ValueError(f"the checkpoint has layers {extra} beyond its {num_layers} decoder layers and the config "
                         f"announces {announced} MTP layers (num_nextn_predict_layers)")  # fmt: skip
    return extra


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
        return read_tensors(files, [key])[key] if key in files else None

    merged, shares = merge_into(target, weights, sources, source_weight, igia, config, layers_prefix)
    return {f"{prefix}{suffix}.weight": weight for suffix, weight in merged.items()}, shares


def _layer_of(key: str, pattern: re.Pattern) -> int | None:
    match = pattern.match(key)
    return int(match.group(1)) if match else None


def _renumber(key: str, new_index: Mapping[int, int], pattern: re.Pattern) -> str:
    match = pattern.match(key)
    if not match:
        return key
    return f"{key[: match.start(1)]}{new_index[int(match.group(1))]}.{match.group(2)}"
