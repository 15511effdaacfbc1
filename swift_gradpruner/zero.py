"""Full LoRA gradients under DeepSpeed ZeRO-1/2/3, read between ``engine.backward`` and ``engine.step``.

``deepspeed.utils.safe_get_full_grad`` (tensor_fragment.py in DeepSpeed 0.19) gathers a parameter's
fp32 gradient, averaged over data-parallel ranks, on every rank: an all-reduce of the fragments
under ZeRO-1/2, an all-gather of the partitions under ZeRO-3. It is a collective, so every rank
must call it for the same parameters in the same order, and under ZeRO-1/2 it is valid only at a
gradient-accumulation boundary, before ``step`` (which unscales, clips and clears). The values it
returns are still multiplied by the fp16 loss scale, hence the division here.
"""

from __future__ import annotations

import torch
from torch import nn

from .capture import GradReader


def full_grad_reader(engine) -> GradReader:
    """A reader of unscaled full gradients for ``read_lora_grads``, valid until ``engine.step``."""
    from deepspeed.utils import safe_get_full_grad

    scale = float(getattr(engine.optimizer, "loss_scale", 1.0) or 1.0)

    def read(param: nn.Parameter) -> torch.Tensor | None:
        grad = safe_get_full_grad(param)
        return None if grad is None else grad / scale

    return read
