"""Parameters and forward FLOPs of a causal LM, counted from its modules (a meta-device model will do).

Matrix multiplies are all that is counted, as ``torch.utils.flop_counter`` counts them: 2 FLOPs per
multiply-add of every ``nn.Linear`` in the decoder layers and the LM head, plus the two attention
products (QK^T and AV, 2 * 2 * heads * head_dim per query-key pair) over every query-key pair, as
the counter charges eager attention, which multiplies the full square before masking (a causal
kernel skips about half of it; torch's counter does not see the CPU's fused attention at all). The
embedding lookup, norms, activations and rotary embeddings cost no matmul FLOPs.
"""

from __future__ import annotations

from torch import nn

from .architecture import decoder_layers, text_config
from .coverage import is_fused_experts


def matmul_weights(model: nn.Module) -> int:
    """Weights that multiply every token: the decoder layers' linears, the routed experts a token goes
    through, and the LM head."""
    layers = sum(m.in_features * m.out_features for m in decoder_layers(model).modules() if isinstance(m, nn.Linear))
    per_token = getattr(text_config(model.config), "num_experts_per_tok", None)
    for expert in fused_experts(model):
        layers += expert.numel() * (per_token or expert.shape[0]) // expert.shape[0]
    head = model.get_output_embeddings()
    return layers + head.in_features * head.out_features


def fused_experts(model: nn.Module) -> list[nn.Parameter]:
    """The routed experts' fused weights (E x out x in) of every decoder layer."""
    return [p for m in decoder_layers(model).modules() if is_fused_experts(m) for p in m.parameters(recurse=False)
            if p.dim() == 3]  # fmt: skip


def attention_width(model: nn.Module) -> int:
    """Sum over decoder layers of query heads x head size: the per-key cost factor of attention."""
    config = text_config(model.config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * len(decoder_layers(model))
    softmax = sum(1 for kind in kinds if kind != "linear_attention")  # linear attention has no QK^T
    return softmax * config.num_attention_heads * head_dim


def forward_flops(model: nn.Module, tokens: int, batch: int = 1) -> int:
    """Matmul FLOPs of one forward pass over ``batch`` sequences of ``tokens`` tokens (no KV cache)."""
    return batch * (2 * matmul_weights(model) * tokens + 4 * attention_width(model) * tokens * tokens)


def flops_per_token(model: nn.Module, context: int) -> float:
    """Forward FLOPs per token of a ``context``-token sequence (training costs about 3x this)."""
    return forward_flops(model, context) / context


def parameters(model: nn.Module) -> int:
    """All parameters, tied weights counted once."""
    return sum(p.numel() for p in model.parameters())
