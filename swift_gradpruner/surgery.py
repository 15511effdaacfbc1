"""Remove decoder layers from a Hugging Face causal LM, in memory and as a plain checkpoint on disk.

Deleting entries of ``model.model.layers`` is not enough: the config must say how many layers are
left (``num_hidden_layers``), per-layer config lists (``layer_types``; Qwen's ``max_window_layers``)
must follow the same selection, and every attention module's ``layer_idx`` must be renumbered
0..L'-1 because the KV cache is indexed by it. ``save_pretrained`` then writes safetensors whose
keys are numbered by position, so transformers, vLLM and ``swift infer`` load the result as an
ordinary model of the same architecture.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .config import GradPruneConfig, GradPruneConfigError
from .merge import merge_linear
from .selection import LayerPlan

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
LAYERS_PREFIX = "model.layers."
"""Module path of the decoder layers in every supported architecture."""


class UnsupportedModelError(GradPruneConfigError):
    """The model's architecture is not one GradPruner knows how to prune."""


def check_supported(config) -> None:
    """Fail early, naming the supported architectures, for any other model type."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"GradPruner does not support model_type {model_type!r}; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (decoder layers at model.model.layers)"
        )
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
        raise UnsupportedModelError(
            f"GradPruner cannot prune a pre-quantised checkpoint (config.json has quantization_config: "
            f"{method}): merging adds weights element by element and needs float weights; prune the "
            "unquantised checkpoint and quantise while training with --quant_method bnb --quant_bits 4 "
            "(phase 1 then trains QLoRA and the merge reads the float weights from disk)"
        )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    check_supported(model.config)
    return model.model.layers


def parameter_counts(model: nn.Module) -> tuple[list[int], int]:
    """Parameters of each decoder layer and of the whole model (tied weights counted once).

    Works on a model built on the meta device, so it can run before any weight is loaded.
    """
    layers = decoder_layers(model)
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    return per_layer, sum(p.numel() for p in model.parameters())


def merge_removed_layers(
    model: nn.Module,
    plan: LayerPlan,
    igia: Callable[[str], torch.Tensor | None],
    config: GradPruneConfig,
) -> dict[int, dict[str, float]]:
    """Merge each layer of ``plan.merged`` into its retained layer, linear by linear (Eq. 5).

    ``igia(name)`` returns the IGIA matrix F of the linear ``name`` (e.g.
    ``model.layers.3.mlp.up_proj``), or None where no LoRA gradient was captured; such linears are
    not merged. Returns, per merged layer, the fraction of each linear's elements that were merged.
    """
    layers = decoder_layers(model)
    fractions: dict[int, dict[str, float]] = {source: {} for source in plan.merged}
    targets: dict[int, list[int]] = {}
    for source, target in plan.merged.items():
        targets.setdefault(target, []).append(source)
    for target, sources in sorted(targets.items()):
        for suffix, linear in _linears(layers[target]).items():
            own = igia(f"{LAYERS_PREFIX}{target}.{suffix}") if config.merge_mode == "fisher" else None
            if config.merge_mode == "fisher" and own is None:
                continue
            pairs, merged_from = [], []
            for source in sources:
                importance = igia(f"{LAYERS_PREFIX}{source}.{suffix}")
                if importance is not None:
                    pairs.append((_linears(layers[source])[suffix].weight, importance))
                    merged_from.append(source)
            if not pairs:
                continue
            merged, shares = merge_linear(
                linear.weight, pairs, topp=config.topp, mode=config.merge_mode, retained_importance=own
            )
            with torch.no_grad():
                linear.weight.copy_(merged)
            for source, share in zip(merged_from, shares):
                fractions[source][suffix] = share
    return fractions


def remove_layers(model: nn.Module, removed: Sequence[int]) -> None:
    """Delete decoder layers in place and make config and ``layer_idx`` agree with what is left."""
    layers = decoder_layers(model)
    gone = set(removed)
    kept = [j for j in range(len(layers)) if j not in gone]
    if not kept:
        raise ValueError("cannot remove every decoder layer")
    _prune_config(model.config, kept)
    model.model.layers = nn.ModuleList(layers[j] for j in kept)
    for new_index, layer in enumerate(model.model.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    if hasattr(model.model, "has_sliding_layers"):
        model.model.has_sliding_layers = "sliding_attention" in model.config.layer_types


@contextmanager
def layers_view(model: nn.Module, kept: Sequence[int]) -> Iterator[nn.Module]:
    """Run ``model`` as if only the decoder layers ``kept`` existed, without changing its weights.

    For removal-damage measurements: the layer list and the per-layer config entries are swapped
    for the view and restored afterwards (``layer_idx`` is left alone, so use no KV cache inside).
    """
    layers = decoder_layers(model)
    config = model.config
    saved = {
        k: getattr(config, k) for k in ("num_hidden_layers", "layer_types", "max_window_layers") if hasattr(config, k)
    }
    sliding = getattr(model.model, "has_sliding_layers", None)
    _prune_config(config, list(kept))
    model.model.layers = nn.ModuleList(layers[j] for j in kept)
    if sliding is not None:
        model.model.has_sliding_layers = "sliding_attention" in config.layer_types
    try:
        yield model
    finally:
        model.model.layers = layers
        for key, value in saved.items():
            setattr(config, key, value)
        if sliding is not None:
            model.model.has_sliding_layers = sliding


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing non-empty output directory unless ``overwrite`` (call before expensive work)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise FileExistsError(
            f"output directory {str(path)!r} exists and is not empty; choose another or allow overwrite"
        )
    return path


def save_checkpoint(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    overwrite: bool = False,
    extra_files: Mapping[str, Callable[[Path], None]] | None = None,
) -> Path:
    """Write a plain HF checkpoint atomically: into a temporary sibling directory, then renamed.

    ``extra_files`` maps a file name to a writer called with its path (e.g. the report). If
    anything fails, nothing is left at ``out_dir`` (an old directory there is kept as it was).
    """
    out_dir = check_output_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, write in (extra_files or {}).items():
            write(tmp / name)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def _prune_config(config, kept: list[int]) -> None:
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        config.layer_types = [layer_types[j] for j in kept]
    window_layers = getattr(config, "max_window_layers", None)
    if window_layers is not None:
        # Qwen: layers at index >= max_window_layers use sliding windows; keep that split.
        config.max_window_layers = sum(1 for j in kept if j < window_layers)
    config.num_hidden_layers = len(kept)
