"""Where the decoder layers of a supported Hugging Face causal LM are, and how big they are."""

from __future__ import annotations

from torch import nn

from .config import GradPruneConfigError

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


def final_norm(model: nn.Module) -> nn.Module:
    """The norm the decoder applies after its last layer."""
    return model.get_decoder().norm


def linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The linear sublayers of one decoder layer by their names in it (e.g. ``mlp.up_proj``)."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def parameter_counts(model: nn.Module) -> tuple[list[int], int]:
    """Parameters of each decoder layer and of the whole model (tied weights counted once).

    Works on a model built on the meta device, so it can run before any weight is loaded.
    """
    layers = decoder_layers(model)
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    return per_layer, sum(p.numel() for p in model.parameters())
