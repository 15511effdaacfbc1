"""Inference speed of the dense and the pruned model, measured side by side in one process.

The report's benchmark: the same random prompt runs through the dense model (before surgery) and
the pruned model (after), on the same device, in the same dtype: one prefill (a forward pass over
the prompt) and one greedy generation of a fixed number of new tokens with the KV cache. Each is
timed at least ``repeats`` times (more for very fast models) after a warm-up and the median is
kept; the ratios dense / pruned say how much faster the pruned model is (> 1 = faster).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

BATCH = 1
PROMPT_TOKENS = 128
NEW_TOKENS = 32
REPEATS = 3
MIN_SECONDS = 1.0
MAX_REPEATS = 50


@dataclass(frozen=True)
class InferenceTiming:
    """Median wall times (milliseconds) of one model on one prompt."""

    prefill_ms: float
    generate_ms: float
    batch: int
    prompt_tokens: int
    new_tokens: int


def time_inference(
    model: nn.Module,
    device: torch.device | str,
    *,
    batch: int = BATCH,
    prompt_tokens: int = PROMPT_TOKENS,
    new_tokens: int = NEW_TOKENS,
    repeats: int = REPEATS,
    seed: int = 0,
) -> InferenceTiming:
    """Time a prefill and a ``new_tokens`` greedy generation of ``model``, which must be on ``device``.

    The prompt is ``batch`` x ``prompt_tokens`` random token ids (shortened to fit the model's
    ``max_position_embeddings``); generation is forced to exactly ``new_tokens`` tokens.
    """
    from transformers import GenerationConfig

    config = model.config
    limit = getattr(config, "max_position_embeddings", None)
    if limit:
        prompt_tokens = max(1, min(prompt_tokens, limit - new_tokens))
    ids = torch.randint(config.vocab_size, (batch, prompt_tokens), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(device)
    mask = torch.ones_like(ids)
    defaults = model.generation_config
    eos = defaults.eos_token_id if defaults is not None else None
    pad = defaults.pad_token_id if defaults is not None else None
    greedy = GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
        eos_token_id=eos, pad_token_id=pad if pad is not None else (eos if isinstance(eos, int) else 0),
    )  # fmt: skip

    def prefill() -> None:
        model(input_ids=ids, attention_mask=mask, use_cache=False)

    def generate() -> None:
        # synced_gpus=False: only this rank generates, even inside a multi-rank ZeRO-3 run, where
        # transformers would otherwise step in lockstep with the other ranks.
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=greedy, synced_gpus=False)
        if out.shape[1] != prompt_tokens + new_tokens:
            raise RuntimeError(f"generation stopped after {out.shape[1] - prompt_tokens} of {new_tokens} tokens")

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            prefill_ms = _median_ms(prefill, device, repeats)
            generate_ms = _median_ms(generate, device, repeats)
    finally:
        model.train(was_training)
    return InferenceTiming(prefill_ms, generate_ms, batch, prompt_tokens, new_tokens)


def compare(dense: InferenceTiming | str, pruned: InferenceTiming | str, device: str, dtype: str) -> dict:
    """The report's ``inference_benchmark`` entry; a str in place of a timing is why it was skipped."""
    entry: dict = {"device": device, "dtype": dtype}
    if isinstance(dense, str) or isinstance(pruned, str):
        entry["skipped"] = dense if isinstance(dense, str) else pruned
        return entry
    entry.update(
        dense=asdict(dense),
        pruned=asdict(pruned),
        prefill_speedup=dense.prefill_ms / pruned.prefill_ms,
        generate_speedup=dense.generate_ms / pruned.generate_ms,
    )
    return entry


def time_on_device(model: nn.Module, device: torch.device | str) -> InferenceTiming | str:
    """Move ``model`` to ``device``, time it, move it back to where it was.

    Returns the reason instead of a timing when the model does not fit on the device.
    """
    home = next(model.parameters()).device
    try:
        model.to(device)
        return time_inference(model, device)
    except torch.OutOfMemoryError as error:
        return f"out of memory on {device}: {str(error).splitlines()[0]}"
    finally:
        model.to(home)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def _median_ms(call: Callable[[], None], device: torch.device | str, repeats: int) -> float:
    """Median of at least ``repeats`` timed calls; calls of a few milliseconds (small models) are
    repeated until MIN_SECONDS have passed (at most MAX_REPEATS), so the median is not noise."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    call()  # warm-up: kernels, allocator, caches
    sync()
    times: list[float] = []
    while len(times) < repeats or (sum(times) < MIN_SECONDS * 1000 and len(times) < MAX_REPEATS):
        start = time.perf_counter()
        call()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)
