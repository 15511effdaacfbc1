"""Where a Hugging Face causal LM keeps its decoder layers, final norm and LM head, for every family.

ms-swift finds the decoder layers from ``model_meta.model_arch`` (``MultiModelKeys.language_model``,
then the first ``nn.ModuleList`` under it, outside the vision tower and aligner: see
``swift/callbacks/lisa.py``). This module needs no swift (the ``gradprune`` CLI and the evaluation harness
prune plain HF models), so it asks transformers instead: ``model.get_decoder()`` is the language model's
decoder stack (``model.model`` for a causal LM, ``model.model.language_model`` for a vision-language
model), its ``layers`` are the decoder layers and its ``norm`` the final norm; ``get_output_embeddings()``
is the LM head. tests/test_families.py checks that this finds, for every supported family, the same layer
list as swift's model_arch.
"""

from __future__ import annotations

from torch import nn

from .config import GradPruneConfigError
from .families import SUPPORTED_MODEL_TYPES

LAYERS_PREFIX = "model.layers."
"""Module path of the decoder layers of a plain causal LM (``layers_prefix`` gives any model's)."""


class UnsupportedModelError(GradPruneConfigError):
    """The model's architecture is not one GradPruner knows how to prune."""


def check_supported(config) -> None:
    """Fail early, naming the supported architectures, for any other model type."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"GradPruner does not support model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
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


def text_config(config):
    """The config that holds the decoder's settings (``num_hidden_layers``, ``layer_types``, ...): the
    config itself for a causal LM, ``text_config`` for a vision-language model."""
    return config.get_text_config(decoder=True)


def auto_class(config):
    """The transformers class that loads a checkpoint of ``config`` whole: a vision-language model's
    ConditionalGeneration class (AutoModelForCausalLM would drop the vision tower of some), else the
    causal LM class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    if getattr(config, "vision_config", None) is not None and type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        return MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config)]
    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def decoder(model: nn.Module) -> nn.Module:
    """The language model's decoder stack: ``layers``, ``norm``; its output is after the final norm."""
    check_supported(model.config)
    stack = model.get_decoder()
    if not isinstance(getattr(stack, "layers", None), nn.ModuleList):
        raise UnsupportedModelError(f"{type(model).__name__}.get_decoder() has no list of decoder layers")
    return stack


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return decoder(model).layers


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last decoder layer (Gemma: ``1 + weight`` scaling; inside the decoder)."""
    return decoder(model).norm


def lm_head(model: nn.Module) -> nn.Module:
    """The output projection. Gemma 2 soft-caps its logits after it (``config.final_logit_softcapping``)."""
    return model.get_output_embeddings()


def module_name(model: nn.Module, part: nn.Module) -> str:
    """The module path of ``part`` inside ``model`` (as in parameter and checkpoint names)."""
    for name, module in model.named_modules():
        if module is part:
            return name
    raise UnsupportedModelError(f"{type(part).__name__} is not among the modules of {type(model).__name__}")


def layers_prefix(model: nn.Module) -> str:
    """Module path of the decoder layers followed by a dot, as in parameter and checkpoint names:
    ``model.layers.`` (causal LMs), ``model.language_model.layers.`` (Qwen2.5-VL in transformers 5)."""
    return f"{module_name(model, decoder_layers(model))}."


def linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The linear sublayers of one decoder layer by their names in it (e.g. ``mlp.up_proj``). Fused expert
    weights (3-d parameters of an experts module) and routers that are not ``nn.Linear`` are not among them."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def parameter_counts(model: nn.Module) -> tuple[list[int], int]:
    """Parameters of each decoder layer and of the whole model (tied weights counted once).

    Works on a model built on the meta device, so it can run before any weight is loaded.
    """
    layers = decoder_layers(model)
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    return per_layer, sum(p.numel() for p in model.parameters())
