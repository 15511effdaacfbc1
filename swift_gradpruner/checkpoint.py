"""Prune a checkpoint on disk: load it (or stream its shards), run ``prune.prune_model``, save the result.

The model runs on rank 0's GPU when it fits there, else spread over the node's GPUs by a device_map
(devices.py), else on the CPU, sized by the weights from_pretrained loads (weight_files.py). A GPU that
runs out of memory anywhere in the prune step (criterion, guard, merge, timing) costs one log line and the
step is redone from a fresh copy of the weights where ``devices.plan_after_oom`` says (after one GPU the
node's GPUs when together they hold the model, then the CPU), reusing what the criterion had already
measured. A GPU that cannot be asked for its free memory (exclusive-process mode) ends the asking.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .architecture import auto_class, layers_prefix, text_config
from .config import IGIA_SCORES, GradPruneConfig
from .devices import CPU, DevicePlan, plan_after_oom, plan_devices
from .importance import IGIAAccumulator
from .prune import PruneResult, Raw, _report_files, prune_model, save_pruned
from .selection import LayerPlan
from .surgery import atomic_dir
from .weight_files import loaded_weight_bytes


def prune_checkpoint(model_dir: str | os.PathLike, accumulator: IGIAAccumulator | None, config: GradPruneConfig,
                     out_dir: str | os.PathLike, extra: dict[str, Any], swift_args: dict[str, Any], *,
                     guard=None, calibration=None, log: Callable[[str], None] = print,
                     warn: Callable[[str], None] = print) -> PruneResult:  # fmt: skip
    """Load the base checkpoint in its own dtype, prune and merge it, save it with its report.

    ``accumulator`` may be None when neither the score nor a merge reads the phase-1 gradients.
    ``swift_args`` becomes the checkpoint's args.json, from which ``swift infer --model`` and
    ``swift export`` take model_type and template (``swift sft`` ignores it: load_args is off there).
    ``guard`` and ``calibration`` are encoded batches of held-out and of training rows
    (swift/holdout.py). ``log`` and ``warn`` receive progress lines and the quality guard's warning.
    The report's ``stage_seconds`` holds the duration of the stages (load, choice, surgery, timing).
    """
    from transformers import AutoTokenizer

    if config.score in IGIA_SCORES and not guard and not config.benchmark and _has_safetensors(model_dir):
        result = _prune_streaming(model_dir, accumulator, config, out_dir, extra, swift_args, log)
    else:
        model, result, loaded = _prune_loaded(model_dir, accumulator, config, guard, calibration, extra, log, warn)
        if result.guard is not None and not result.guard.ok:
            warn(f"[GradPruner] WARNING: {result.guard.message(len(result.plan.removed))}")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        log(f"[GradPruner] saving the pruned model to {out_dir} ...")
        result.report["stage_seconds"]["load"] = loaded
        save_pruned(model, result, out_dir, tokenizer=tokenizer, overwrite=True,
                    extra_files={"args.json": swift_args, **_other_files(model_dir)},
                    after_save=_after_save(model_dir))  # fmt: skip
    if "vllm_unsupported" in result.report:
        warn(f"[GradPruner] WARNING: vLLM cannot serve the pruned model: {result.report['vllm_unsupported']}")
    return result


def _prune_loaded(model_dir, accumulator, config, guard, calibration, extra, log, warn):
    """Load the model where ``_device_plan`` says and prune it; on running out of GPU memory, load it again
    where ``devices.plan_after_oom`` says (one GPU -> the node's GPUs -> the CPU) and prune that; the CPU
    is tried once. Returns the model, the result and the seconds spent loading."""
    cache: dict = {}  # the criterion's measurements survive a restart elsewhere
    loaded = [0.0]

    def attempt(plan: DevicePlan):
        start = time.perf_counter()
        model = _load(model_dir, plan)
        loaded[0] += time.perf_counter() - start
        result = prune_model(model, accumulator, config, calibration=calibration, guard=guard,
                             criterion_cache=cache, device=plan.device, extra=extra, log=log)  # fmt: skip
        return model, result

    plan, retried = _device_plan(model_dir), False
    log(f"[GradPruner] prune step on {plan.describe()}")
    while True:
        try:
            return (*attempt(plan), loaded[0])
        except torch.OutOfMemoryError as error:
            if retried and not plan.gpus:
                raise
            failure = _first_line(error)
        # Out of the except block: its traceback held the GPU model and the dense targets, so that nothing
        # could be freed while it lived.
        free_cuda_memory()
        following, retried = _plan_after_oom(model_dir, plan), True
        warn(f"[GradPruner] out of GPU memory while pruning on {plan.describe()} ({failure}); doing the prune "
             f"step again on {following.describe()}" + ("" if following.gpus else " (slower)"))  # fmt: skip
        plan = following


def _device_plan(model_dir) -> DevicePlan:
    """devices.plan_devices from the GPUs' free memory and the bytes of weights that from_pretrained loads
    (weight_files.py: not a .bin beside the safetensors, consolidated.safetensors or optimizer.pt). The
    other GPUs are asked only when the model does not fit on rank 0's (asking leaves a CUDA context on each).
    A GPU that cannot be asked (``_free_memory``) ends the asking: the plan uses what was read."""
    if not torch.cuda.is_available():
        return CPU
    size, layers = _sizing(model_dir)
    try:
        first = torch.cuda.current_device()
    except RuntimeError as error:
        return DevicePlan(reason=f"the current GPU could not be asked for its free memory ({_first_line(error)})")
    free, stopped = _free_memory([first])
    if not free:
        return DevicePlan(reason=stopped)
    plan = plan_devices(free, size, layers)
    if plan.gpus or torch.cuda.device_count() < 2:
        return plan
    more, stopped = _free_memory([gpu for gpu in range(torch.cuda.device_count()) if gpu != first])
    return _noting(plan_devices({**free, **more}, size, layers), stopped)


def _plan_after_oom(model_dir, plan: DevicePlan) -> DevicePlan:
    """devices.plan_after_oom with every GPU's free memory read again (the failed attempt freed)."""
    if len(plan.gpus) != 1:
        return plan_after_oom(plan, {}, 0, 0)
    size, layers = _sizing(model_dir)
    first = plan.gpus[0]
    free, stopped = _free_memory([first, *(gpu for gpu in range(torch.cuda.device_count()) if gpu != first)])
    return _noting(plan_after_oom(plan, free, size, layers), stopped)


def _noting(plan: DevicePlan, stopped: str) -> DevicePlan:
    """``plan``, its CPU reason followed by why asking the GPUs stopped (``_free_memory``), if it did."""
    return replace(plan, reason=f"{plan.reason}; {stopped}") if stopped and not plan.gpus else plan


def _sizing(model_dir) -> tuple[int, int]:
    """Bytes of the weights from_pretrained loads, and the number of decoder layers."""
    from transformers import AutoConfig

    return loaded_weight_bytes(model_dir), text_config(AutoConfig.from_pretrained(model_dir)).num_hidden_layers


def _free_memory(gpus: list[int]) -> tuple[dict[int, int], str]:
    """The free bytes of ``gpus``, asked in order up to the first that cannot be asked (an exclusive-process
    GPU held by another process raises), and why the asking stopped ('' when it did not)."""
    free: dict[int, int] = {}
    for gpu in gpus:
        try:
            free[gpu] = torch.cuda.mem_get_info(gpu)[0]
        except RuntimeError as error:
            return free, f"cuda:{gpu} could not be asked for its free memory ({_first_line(error)})"
    return free, ""


def _load(model_dir, plan: DevicePlan = CPU):
    """The whole model in its own dtype where ``plan`` puts it, on this rank alone, also inside a ZeRO-3 run."""
    from transformers import AutoConfig

    memory = {"max_memory": plan.max_memory} if plan.max_memory else {}
    with zero3_init_off():
        model_class = auto_class(AutoConfig.from_pretrained(model_dir))
        return model_class.from_pretrained(model_dir, dtype="auto", device_map=plan.device_map, **memory)


def _prune_streaming(model_dir, accumulator, config, out_dir, extra, swift_args, log) -> PruneResult:
    """prune_checkpoint without loading the model: nothing needs to run it (an IGIA ranking, no quality
    guard, no timing), so the shards are pruned one layer at a time (streaming.py)."""
    from .streaming import write_pruned

    meta = _meta_model(model_dir)
    prefix = layers_prefix(meta)
    log(f"[GradPruner] streaming surgery: {model_dir} is pruned shard by shard, one layer in memory at a time")
    with atomic_dir(out_dir, overwrite=True) as folder:

        def surgery(plan: LayerPlan, igia) -> dict[int, dict[str, float]]:
            return write_pruned(model_dir, folder, plan, igia, config, prefix=prefix)

        result = prune_model(meta, accumulator, config, extra=extra, log=log, surgery=surgery)
        for name, write in _report_files(result, {"args.json": swift_args}).items():
            write(folder / name)
    return result


def _meta_model(model_dir):
    """The model built on the meta device from its config (no weights)."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(model_dir)
    # Under ZeRO-3 transformers would wrap the constructor in deepspeed.zero.Init, a collective that the
    # other ranks (waiting for rank 0) never join: rank 0 would hang.
    with zero3_init_off(), torch.device("meta"):
        return auto_class(model_config)(model_config)


def _has_safetensors(model_dir) -> bool:
    """A safetensors checkpoint whose decoder-layer keys are what the model calls them (streaming.py)."""
    from .streaming import INDEX_NAME, has_layer_keys, mtp_count

    if not ((Path(model_dir) / "model.safetensors").is_file() or (Path(model_dir) / INDEX_NAME).is_file()):
        return False
    meta = _meta_model(model_dir)
    num_layers = text_config(meta.config).num_hidden_layers
    return has_layer_keys(model_dir, layers_prefix(meta), num_layers, mtp_count(meta.config))


def _other_files(model_dir) -> dict[str, Raw]:
    """Files of the base checkpoint that save_pretrained and the tokenizer do not write (a vision-language
    model's processor and chat template), as extra files for the pruned checkpoint."""
    from .streaming import carried_files

    written = {"generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "args.json"}  # fmt: skip
    return {path.name: Raw(path.read_bytes()) for path in carried_files(model_dir) if path.name not in written}


def _after_save(model_dir) -> list[Callable[[Path], None]]:
    """Steps run on the saved folder once save_pretrained wrote its shards and index: the base shards'
    multi-token-prediction tensors, which the loaded model does not hold, appended as new shards with the
    index rewritten (``streaming.append_mtp``)."""
    from .streaming import append_mtp, has_mtp

    if not has_mtp(model_dir):
        return []
    return [lambda folder: append_mtp(model_dir, folder, layers_prefix(_meta_model(model_dir)))]


def free_cuda_memory() -> None:
    """Collect garbage, then hand the CUDA cache back: accelerate's hooks hold reference cycles, so a
    dispatched model's tensors are freed only by the collector, and emptying the cache first frees nothing."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


@contextmanager
def zero3_init_off() -> Iterator[None]:
    """Build or load a whole model on one rank even inside a ZeRO-3 run (transformers would partition it
    with deepspeed.zero.Init, a collective of all ranks)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved
