"""Which weights of each decoder layer phase 1's LoRA covers, so that IGIA layer scores (Eq. 4) are only
compared between layers whose sums cover the same weights.

Eq. 4 sums the IGIA matrix over a layer's LoRA-adapted weights. With swift's default ``all-linear``
targets a mixture-of-experts layer may carry LoRA on its attention only (Mixtral, gpt-oss: routed experts
are fused 3-d parameters, not ``nn.Linear``), or peft 0.20 moves the MLP targets onto the fused experts
(``ParamWrapper``), leaving a dense layer's MLP or the shared experts without LoRA. A layer whose experts
carry no LoRA, or whose covered weights differ from another layer's, would be ranked on a partial sum.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .architecture import decoder_layers, layers_prefix
from .config import GradPruneConfigError

_NOT_MATRICES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def is_fused_experts(module: nn.Module) -> bool:
    """A module holding 3-d weights of its own that is not a linear or convolution (routed experts)."""
    if isinstance(module, (nn.Linear, *_NOT_MATRICES)):
        return False
    return any(p.dim() == 3 for p in module.parameters(recurse=False))


def matrix_weights(layer: nn.Module) -> list[str]:
    """Names in ``layer`` of its trainable matrices: every ``nn.Linear`` and every 3-d parameter of another
    module (fused routed experts, e.g. ``mlp.experts.gate_up_proj``); norms, biases, convolutions and
    routers that are not ``nn.Linear`` are not counted. A peft-wrapped layer gives its base model's names."""
    names: list[str] = []
    for name, module in layer.named_modules():
        if "lora_" in name:
            continue
        name = name.replace(".base_layer", "")
        if isinstance(module, nn.Linear):
            names.append(name)
        elif is_fused_experts(module):
            names += [f"{name}.{p}" if name else p for p, t in module.named_parameters(recurse=False) if t.dim() == 3]
    return list(dict.fromkeys(names))


def uncovered(model: nn.Module, lora_names: Iterable[str]) -> dict[int, list[str]]:
    """Per decoder layer (only those with any), its matrix weights without LoRA. ``lora_names`` are the
    captured linears' names in the base model (``capture.LoraPair.name``; fused experts as ``<param>.<e>``)."""
    prefix = layers_prefix(model)
    covered: dict[int, set[str]] = {}
    for name in lora_names:
        if name.startswith(prefix):
            index, _, rest = name[len(prefix) :].partition(".")
            covered.setdefault(int(index), set()).add(rest)
    gaps = {}
    for j, layer in enumerate(decoder_layers(model)):
        mine = covered.get(j, set())
        missing = [w for w in matrix_weights(layer) if w not in mine and not any(c.startswith(f"{w}.") for c in mine)]
        if missing:
            gaps[j] = missing
    return gaps


def incomplete_layers(model: nn.Module, lora_names: Iterable[str]) -> str | None:
    """Why the IGIA layer scores of ``model`` under these LoRA targets are not comparable, or None.

    Not comparable: some layer's routed experts (3-d fused weights) carry no LoRA, or a weight is covered
    in one layer and left out in another layer that has it (e.g. a dense layer's MLP next to MoE layers).
    """
    lora_names = list(lora_names)
    gaps = uncovered(model, lora_names)
    if not gaps:
        return None
    layers = decoder_layers(model)
    experts = {j: [w for w in missing if _is_fused(layers[j], w)] for j, missing in gaps.items()}
    experts = {j: w for j, w in experts.items() if w}
    everywhere = set.intersection(*(set(gaps.get(j, ())) for j in range(len(layers))))
    uneven = {j: sorted(set(w) - everywhere) for j, w in gaps.items() if set(w) - everywhere}
    if not experts and not uneven:
        return None  # every layer leaves out the same weights (e.g. --target_modules q_proj v_proj): comparable
    shown = experts or uneven
    first = sorted(shown)[:4]
    detail = "; ".join(f"layer {j}: {', '.join(shown[j][:4])}" for j in first)
    return f"phase 1's LoRA leaves weights of {len(shown)} decoder layers without gradients ({detail})"


def _is_fused(layer: nn.Module, name: str) -> bool:
    module_name, _, param = name.rpartition(".")
    module = layer.get_submodule(module_name) if module_name else layer
    return not isinstance(module, nn.Linear) and getattr(module, param, None) is not None


def check_igia_comparable(model: nn.Module, lora_names: Iterable[str], score: str) -> None:
    """Refuse an IGIA layer ranking (``--gradprune_score squared|norm``) over layers with partial LoRA sums."""
    partial = incomplete_layers(model, lora_names)
    if partial:
        raise GradPruneConfigError(
            f"--gradprune_score {score} ranks layers by their IGIA sums (Eq. 4), but {partial}: those layers would "
            "be ranked on partial sums; use a criterion that needs no gradients (e.g. --gradprune_score "
            "block_influence) or give them LoRA (--target_modules / --target_parameters)"
        )
