"""Per-layer config entries after decoder layers are removed, for every family, and a check that the
pruned config still describes the kept layers.

Three kinds of entries (on the decoder's config: ``text_config`` of a vision-language model):

* lists indexed by layer (``layer_types`` with full/sliding/linear attention, ``mlp_layer_types``, per-layer
  rope or head lists, and any list of ``num_hidden_layers`` entries whose name mentions layers): the
  kept layers' entries, in order;
* lists of layer indices (``mlp_only_layers``, ...): the kept ones, renumbered;
* rules that derive a layer's kind from its index: ``decoder_sparse_step`` (with ``mlp_only_layers``),
  ``first_k_dense_replace``, ``max_window_layers``. The rule is rewritten for the kept layers; where the
  same rule no longer describes them its explicit per-layer form is written (``decoder_sparse_step`` 1
  plus the dense layers in ``mlp_only_layers``).

``check_removal`` then builds the dense and the pruned model on the meta device from the two configs and
compares every kept layer with its new position (module classes, parameter shapes, and the plain
attributes each module took from the config, such as a sliding window or a layer kind), and the
parameters outside the decoder layers. A removal the config cannot express fails there, before any
weight is touched, with one line naming the layers that cannot go.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from .architecture import UnsupportedModelError, auto_class, text_config

PER_LAYER_LISTS = ("layer_types", "mlp_layer_types", "layers_block_type", "layer_rope_theta",
                   "num_key_value_heads_per_layer", "num_attention_heads_per_layer")  # fmt: skip
INDEX_LISTS = ("mlp_only_layers", "moe_layers", "cross_attention_layers", "attn_layer_indices")
RULE_KEYS = ("decoder_sparse_step", "first_k_dense_replace", "max_window_layers")


_IGNORED = ("training", "layer_idx")


class LayerRemovalError(UnsupportedModelError):
    """The config cannot describe the model with these layers removed."""


def _is_per_layer(key: str, value, num_layers: int) -> bool:
    if key in INDEX_LISTS or not isinstance(value, (list, tuple)) or len(value) != num_layers:
        return False
    return key in PER_LAYER_LISTS or "layer" in key


def layer_keys(config) -> list[str]:
    """The decoder config's entries that depend on which layers exist (what ``prune_config`` may change)."""
    config = text_config(config)
    num = config.num_hidden_layers
    keys = ["num_hidden_layers"]
    for key, value in vars(config).items():
        if key.startswith("_") or value is None:
            continue
        if _is_per_layer(key, value, num) or key in INDEX_LISTS or key in RULE_KEYS:
            keys.append(key)
    return keys


def prune_config(config, kept: Sequence[int]) -> None:
    """Rewrite the per-layer entries of ``config`` (its decoder's config) in place for the layers ``kept``."""
    config = text_config(config)
    kept = list(kept)
    num = config.num_hidden_layers
    new_index = {j: i for i, j in enumerate(kept)}
    sparse = _sparse_rule(config, num)
    for key in layer_keys(config):
        value = getattr(config, key)
        if key in INDEX_LISTS:
            setattr(config, key, [new_index[j] for j in value if j in new_index])
        elif key != "num_hidden_layers" and _is_per_layer(key, value, num):
            setattr(config, key, type(value)(value[j] for j in kept))
    if getattr(config, "max_window_layers", None) is not None:
        # Qwen: layers below max_window_layers use full attention, those from it on may slide; keep that split.
        config.max_window_layers = sum(1 for j in kept if j < config.max_window_layers)
    if getattr(config, "first_k_dense_replace", None) is not None:
        # DeepSeek / GLM-4-MoE: the first k layers are dense. Order is kept, so the dense ones stay a prefix.
        config.first_k_dense_replace = sum(1 for j in kept if j < config.first_k_dense_replace)
    if sparse is not None:
        config.decoder_sparse_step = 1
        config.mlp_only_layers = [i for i, j in enumerate(kept) if not sparse[j]]
    config.num_hidden_layers = len(kept)


def _sparse_rule(config, num: int) -> list[bool] | None:
    """Qwen-MoE's rule (layer j has experts iff j not in mlp_only_layers and (j + 1) % decoder_sparse_step
    == 0), evaluated per layer, when the config has it with a step other than 1; else None."""
    step = getattr(config, "decoder_sparse_step", None)
    if step in (None, 1):
        return None
    dense = set(getattr(config, "mlp_only_layers", None) or [])
    experts = getattr(config, "num_experts", 0) or 0
    return [j not in dense and experts > 0 and (j + 1) % step == 0 for j in range(num)]


def pruned_config(config, kept: Sequence[int]):
    """A copy of ``config`` (the whole config of a vision-language model) with ``prune_config`` applied."""
    new = copy.deepcopy(config)
    prune_config(new, kept)
    return new


def check_removal(config, kept: Sequence[int]) -> None:
    """Raise LayerRemovalError (one line) if the config rewritten for ``kept`` does not build the kept layers
    as they are, or changes anything outside the decoder layers."""
    num = text_config(config).num_hidden_layers
    removed = [j for j in range(num) if j not in set(kept)]
    if not removed:
        return
    dense = _signatures(config)
    problem = _mismatch(dense, config, list(kept))
    if problem is None:
        return
    culprits = [j for j in removed if _mismatch(dense, config, [k for k in range(num) if k != j]) is not None]
    raise LayerRemovalError(
        f"GradPruner cannot remove layers {culprits or removed} of this {config.model_type} model: {problem}, and its "
        "config has no per-layer form that keeps the other layers as they are; keep those layers (choose another "
        "--gradprune_prune_layers or --gradprune_score)"
    )


def _mismatch(dense, config, kept: list[int]) -> str | None:
    layers, outside = dense
    new_layers, new_outside = _signatures(pruned_config(config, kept))
    if new_outside != outside:
        return "parameters outside the decoder layers depend on the number of layers"
    for i, j in enumerate(kept):
        if new_layers[i] != layers[j]:
            return f"layer {j} would be built differently at position {i} (the config derives layer kinds from indices)"
    return None


def _signatures(config) -> tuple[list[list[tuple]], list[tuple]]:
    """Per decoder layer: (module path, class, plain attributes, own parameter shapes) of every module; and
    the names and shapes of the parameters outside the decoder layers. Built on the meta device."""
    from .architecture import decoder_layers, layers_prefix

    config = type(config).from_dict(config.to_dict())  # as from_pretrained will read it back from config.json
    with torch.device("meta"):
        model = auto_class(config)(config)
    prefix = layers_prefix(model)
    layers = [_layer_signature(layer) for layer in decoder_layers(model)]
    outside = [(n, tuple(p.shape)) for n, p in model.named_parameters() if not n.startswith(prefix)]
    return layers, outside


def _layer_signature(layer: nn.Module) -> list[tuple]:
    out = []
    for name, module in layer.named_modules():
        plain = {k: v for k, v in vars(module).items() if isinstance(v, (bool, int, float, str))}
        attrs = tuple(sorted((k, v) for k, v in plain.items() if not k.startswith("_") and k not in _IGNORED))
        shapes = tuple((n, tuple(p.shape)) for n, p in module.named_parameters(recurse=False))
        out.append((name, type(module).__name__, attrs, shapes))
    return out
