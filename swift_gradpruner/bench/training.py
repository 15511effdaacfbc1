"""One fine-tuning optimizer step, timed, with its peak memory: LoRA or full, same batch for both models.

The trainer path is a plain PyTorch loop (the transformers model's forward with labels, backward,
``torch.optim.AdamW`` step, gradients set to None), not swift's Trainer: it times the model, not
data loading, logging or checkpointing. LoRA is peft's, rank 8 on every linear of the model.

Peak memory on CUDA is the allocator's: the step's high-water mark above what was allocated before
it, plus this model's own weights and optimizer state (so another model resident on the same GPU
is not counted). The CPU has no allocator peak; there it is weights + gradients + optimizer state +
the activations autograd saved during the forward pass, summed from the tensors themselves.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

LORA_RANK = 8
LEARNING_RATE = 1e-5
TRAINER_PATH = (
    "plain PyTorch loop: forward with labels, backward, torch.optim.AdamW step (LoRA: peft, rank 8, all linears)"
)


class TrainingStep:
    """A model prepared for one kind of fine-tuning, whose ``step()`` returns seconds per optimizer step."""

    def __init__(self, model: nn.Module, mode: str, *, batch: int, seq: int, seed: int = 0) -> None:
        if mode == "lora":
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules="all-linear")
            model = get_peft_model(model, lora)
        elif mode != "full":
            raise ValueError(f"training mode {mode!r} is not lora or full")
        self.model = model.train()
        self.device = next(model.parameters()).device
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=LEARNING_RATE)
        generator = torch.Generator().manual_seed(seed)
        vocab = model.config.vocab_size
        self.ids = torch.randint(3, vocab, (batch, seq), generator=generator).to(self.device)
        self.peak_bytes = 0

    def step(self) -> float:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        start = time.perf_counter()
        with _saved_activation_bytes(self.model) as saved:
            loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        grads = sum(_bytes(p.grad) for p in self.trainable if p.grad is not None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        own = self.state_bytes()
        peak = torch.cuda.max_memory_allocated(self.device) - before + own if cuda else own + grads + saved[0]
        self.peak_bytes = max(self.peak_bytes, peak)
        return elapsed

    def state_bytes(self) -> int:
        """Weights and optimizer state held between steps."""
        weights = sum(_bytes(p) for p in self.model.parameters())
        optimizer = sum(_bytes(t) for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t))
        return weights + optimizer

    def close(self) -> None:
        self.model = self.optimizer = self.trainable = None


@contextmanager
def _saved_activation_bytes(model: nn.Module) -> Iterator[list[int]]:
    """Sum the bytes of the distinct tensors other than weights that autograd saves inside the block."""
    total, seen = [0], {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total[0] += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield total


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
