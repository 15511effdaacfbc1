"""Read the LoRA factor gradients (gA, gB) of every adapted linear of a peft model, once per step.

A fused experts parameter (E x ... , wrapped by peft's ``ParamWrapper``) has one LoRA pair for all its
experts: A is (E*r) x in with expert e's rows at [e*r, (e+1)*r), B is out x (E*r) with expert e's columns at
e, e+E, e+2E, ... (peft's ``get_delta_weight``). Each expert is its own low-rank update B_e A_e, so each
expert is captured as its own linear ``<param>.<e>`` (e.g. ``model.layers.1.mlp.experts.gate_up_proj.3``):
Eq. 2-4 then hold per expert, and a layer's score sums its experts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraPair:
    """The LoRA factors of one adapted linear, named as the linear is named in the base model."""

    name: str
    lora_a: nn.Parameter
    lora_b: nn.Parameter
    experts: int = 1
    """Experts sharing this pair (a fused experts parameter); 1 for a linear."""


def lora_pairs(model: nn.Module, adapter: str = "default") -> list[LoraPair]:
    """Every (A, B) parameter pair of ``adapter`` in a peft LoRA model, in module order.

    The order is the same on every rank, which DeepSpeed's collective gradient reads require.
    """
    from peft.tuners.lora import LoraLayer

    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in getattr(module, "lora_A", {}):
            base_name = name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name
            experts = 1
            if hasattr(module, "parameter_name"):  # peft's ParamWrapper (nested ones wrap each other)
                base_name = f"{base_name.replace('.base_layer', '')}.{module.parameter_name}"
                experts = getattr(module, "num_experts", 1)
            pairs.append(LoraPair(base_name, module.lora_A[adapter].weight, module.lora_B[adapter].weight, experts))
    return pairs


GradReader = Callable[[nn.Parameter], torch.Tensor | None]


def local_grad(param: nn.Parameter) -> torch.Tensor | None:
    return param.grad


def read_lora_grads(
    pairs: list[LoraPair], read: GradReader = local_grad
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{linear name: (gA, gB)} for one step. A factor without gradient counts as zero.

    ``read`` maps a parameter to its full gradient (default: ``param.grad``; under DeepSpeed ZeRO a
    gathering reader, called for every parameter in the same order on all ranks).
    """
    grads = {}
    for pair in pairs:
        grad_a, grad_b = read(pair.lora_a), read(pair.lora_b)
        grad_a, grad_b = _or_zeros(grad_a, pair.lora_a), _or_zeros(grad_b, pair.lora_b)
        if pair.experts == 1:
            grads[pair.name] = (grad_a, grad_b)
            continue
        per_a = grad_a.reshape(pair.experts, -1, grad_a.shape[-1])  # e r i
        per_b = grad_b.reshape(grad_b.shape[0], -1, pair.experts)  # o r e
        for e in range(pair.experts):
            grads[f"{pair.name}.{e}"] = (per_a[e], per_b[:, :, e].contiguous())
    return grads


def _or_zeros(grad: torch.Tensor | None, param: nn.Parameter) -> torch.Tensor:
    if grad is not None:
        return grad.detach()
    # Under ZeRO-3 a parameter's local tensor is a partition; ds_shape is its full shape.
    return torch.zeros(getattr(param, "ds_shape", param.shape), device=param.device)
