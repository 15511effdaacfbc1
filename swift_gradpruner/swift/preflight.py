"""Everything about a ``swift sft --gradprune`` run that can be checked before a model is loaded."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch

from ..architecture import auto_class, check_supported, decoder_layers, layers_prefix
from ..config import IGIA_SCORES, GradPruneConfig, GradPruneConfigError
from ..coverage import check_igia_comparable
from ..selection import layers_to_remove
from .args import RAY_REFUSED

DATA_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".txt", ".parquet", ".arrow")


def check_argv_paths(argv: list[str]) -> None:
    """Paths that swift would only trip over after loading the model (or with a traceback while parsing):
    an --output_dir that is a file, a local --dataset / --val_dataset file that does not exist."""
    values = _flag_values(argv)
    for out in values.get("--output_dir", []):
        if Path(out).exists() and not Path(out).is_dir():
            raise GradPruneConfigError(f"--output_dir {out} is a file, not a folder; choose another --output_dir")
    for flag in ("--dataset", "--val_dataset"):
        for entry in values.get(flag, []):
            path = entry.split("#")[0]  # swift's "file#500" takes 500 rows
            local = path.startswith(("/", "./", "../", "~")) or path.lower().endswith(DATA_FILE_SUFFIXES)
            if local and not Path(path).expanduser().exists():
                raise GradPruneConfigError(f"{flag} {entry}: no such file ({Path(path).expanduser().resolve()})")


def _flag_values(argv: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    current = None
    for token in argv:
        if token.startswith("--"):
            current, eq, value = token.partition("=")
            out[current] = [value] if eq else []
        elif current is not None:
            out[current].append(token)
    return out


def parse_sft_args(argv: list[str]):
    import os

    from swift.arguments import SftArguments
    from swift.utils import parse_args

    # swift exports its logging dir with os.environ.setdefault; a second parse in this process
    # would otherwise send the later phase's TensorBoard events into the first one's folder.
    os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
    args, remaining = parse_args(SftArguments, argv)
    if remaining and not args.ignore_args_error:
        raise ValueError(f"remaining_argv: {remaining}")
    return args


@dataclass(frozen=True)
class ModelFacts:
    """What preflight learnt from the model's config (no weights), for the later checks of rank 0."""

    layers: int
    remove: int
    """Layers the run removes (the ceiling for prune_layers=auto)."""
    kept_compute: float
    """Share of the per-token matmul weights (decoder linears and LM head) the pruned model keeps."""
    wraps_parameters: bool = False
    """Phase 1's LoRA wraps fused expert parameters (peft's ParamWrapper: a non-LoRA run's phase 1 uses
    ``--lora_dropout 0``)."""


def preflight(args, config: GradPruneConfig) -> ModelFacts:
    """Every check that needs no model weights and no data, so bad input fails before anything is loaded."""
    if args.task_type != "causal_lm":
        raise GradPruneConfigError(
            f"--task_type {args.task_type} is not supported: GradPruner prunes causal language models only"
        )
    if args.tuner_backend != "peft":
        raise GradPruneConfigError(
            f"--tuner_backend {args.tuner_backend} is not supported: GradPruner's phase 1 needs peft LoRA; "
            "use --tuner_backend peft"
        )
    if args.fsdp:
        raise GradPruneConfigError(
            f"--fsdp {args.fsdp} is not supported with --gradprune yet (FSDP shards the LoRA gradients and "
            "GradPruner reads them through DeepSpeed's API): use --deepspeed zero2 or zero3"
        )
    if getattr(args, "use_ray", False):  # `swift sft` stops earlier (entry.refuse_ray); this is for the API
        raise GradPruneConfigError(RAY_REFUSED)
    if args.cached_dataset:
        raise GradPruneConfigError(
            f"--cached_dataset {' '.join(args.cached_dataset)} is not supported with --gradprune: GradPruner hashes "
            "(to reuse earlier work) and holds out rows of --dataset only; pass the raw rows with --dataset"
        )
    if config.needs_calibration and args.streaming:
        raise GradPruneConfigError(
            f"--gradprune_score {config.score} runs the model on calibration rows, which a --streaming dataset "
            "cannot provide before training; use --streaming false or --gradprune_score squared"
        )
    if config.prune_layers == "auto" and args.streaming:
        raise GradPruneConfigError(
            "--gradprune_prune_layers auto measures the loss on held-out rows, which a --streaming dataset cannot "
            "provide; use --streaming false or set --gradprune_prune_layers to a number"
        )
    if args.adapters:
        raise GradPruneConfigError(
            "--adapters cannot be combined with --gradprune: adapters trained on the dense model do not fit "
            "the pruned one; merge them first (swift export --merge_lora true) and prune the merged model"
        )
    from transformers import AutoConfig

    check_supported(_raw_config(args.model_dir))  # custom-code models end here, before AutoConfig runs their code
    model_config = AutoConfig.from_pretrained(args.model_dir)
    check_supported(model_config)
    meta = meta_model(model_config)
    num_layers = len(decoder_layers(meta))
    auto = config.prune_layers == "auto"
    remove = layers_to_remove(replace(config, prune_layers=None, merge_layers=0) if auto else config, num_layers)
    check_lora_targets(args, meta, every_layer=config.needs_gradients)
    names, wraps_parameters = phase1_lora(args, model_config)
    if wraps_parameters and args.tuner_type == "lora" and args.lora_dropout:
        raise GradPruneConfigError(
            f"--lora_dropout {args.lora_dropout}: your LoRA targets reach this model's fused expert weights, which "
            "peft wraps with ParamWrapper, and ParamWrapper refuses dropout (phase 1 and your own run would both "
            "fail after loading the model); pass --lora_dropout 0"
        )
    if config.score in IGIA_SCORES:
        check_igia_comparable(meta, names, config.score)
    facts = ModelFacts(layers=num_layers, remove=remove, kept_compute=_kept_compute(meta, remove),
                       wraps_parameters=wraps_parameters)  # fmt: skip
    if config.needs_gradients and args.max_steps and args.max_steps > 0:
        config.phase1_steps(args.max_steps)
    return facts


def _raw_config(model_dir) -> SimpleNamespace:
    """config.json as read from disk, without running any code it names (auto_map)."""
    import json

    path = Path(model_dir) / "config.json"
    values = json.loads(path.read_text()) if path.is_file() else {}
    return SimpleNamespace(model_type=values.get("model_type"), quantization_config=values.get("quantization_config"))


def _kept_compute(meta, remove: int) -> float:
    """Share of the per-token matmul weights left after removing ``remove`` (equal-sized) decoder layers."""
    from ..flops import matmul_weights

    layers = decoder_layers(meta)
    per_layer = sum(m.in_features * m.out_features for m in layers[0].modules() if isinstance(m, torch.nn.Linear))
    return 1 - remove * per_layer / matmul_weights(meta)


def check_lora_targets(args, meta_model, every_layer: bool) -> None:
    """The LoRA targets must match a linear of the decoder layers; with ``every_layer`` (phase 1's
    gradients are read) of every decoder layer: an IGIA score sums the gradients of a layer's adapted
    linears, so a layer without any would score 0 and be removed first, silently."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    targets, regex = phase1_targets(args)
    if regex is None and "all-linear" in targets:
        return
    lora = LoraConfig(target_modules=regex or [t for t in targets if t != "all-linear"])
    linears = [n for n, m in meta_model.named_modules() if isinstance(m, torch.nn.Linear)]
    prefix = layers_prefix(meta_model)
    layers = len(decoder_layers(meta_model))
    covered = {int(n[len(prefix) :].split(".")[0]) for n in linears
               if n.startswith(prefix) and check_target_module_exists(lora, n)}  # fmt: skip
    missing = [j for j in range(layers) if j not in covered]
    shown = regex or " ".join(targets)
    if not covered:
        raise GradPruneConfigError(
            f"LoRA target modules {shown!r} match no linear layer of the model's decoder layers; its linears "
            f"are named {sorted({n.rsplit('.', 1)[-1] for n in linears})}; use --target_modules all-linear"
        )
    if not missing or not every_layer:
        return
    raise GradPruneConfigError(
        f"LoRA target modules {shown!r} adapt no linear of decoder layers {_ranges(missing)} (of 0-{layers - 1}): "
        "their IGIA scores would be 0 and they would be removed first; target every decoder layer "
        "(--target_modules all-linear), or choose layers without phase-1 gradients (e.g. --gradprune_score "
        "block_influence --gradprune_merge_layers 0)"
    )


def _ranges(values: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7' (sorted, distinct values)."""
    runs: list[list[int]] = []
    for value in values:
        if runs and value == runs[-1][-1] + 1:
            runs[-1].append(value)
        else:
            runs.append([value])
    return ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else f"{run[0]}" for run in runs)


def meta_model(model_config):
    """The model built on the meta device (no memory, no weights)."""
    # The class itself, not from_config: under ZeRO-3 from_config would initialise through DeepSpeed.
    with torch.device("meta"):
        return auto_class(model_config)(model_config)


def phase1_lora(args, model_config) -> tuple[list[str], bool]:
    """What phase 1's LoRA will adapt, found the way swift and peft will find it (swift's target expansion,
    e.g. ``all-linear``, then peft 0.20's injection, which moves MLP targets of some MoE families onto
    their fused expert weights) on a meta-device model: the adapted weights' names (``capture.LoraPair``)
    and whether any is a fused parameter (peft's ParamWrapper, which needs ``lora_dropout`` 0)."""
    from types import SimpleNamespace

    from peft import LoraConfig, inject_adapter_in_model
    from swift.pipelines.train.tuner import get_target_modules

    from ..capture import lora_pairs

    lora_args = args
    if args.tuner_type != "lora":
        lora_args = SimpleNamespace(target_modules=["all-linear"], target_parameters=None, freeze_llm=False,
                                    freeze_vit=args.freeze_vit, freeze_aligner=args.freeze_aligner)  # fmt: skip
    model = meta_model(model_config)
    model.model_meta, model.model_info = args.model_meta, args.model_info
    lora = LoraConfig(r=8, target_modules=get_target_modules(lora_args, model), lora_dropout=0.0,
                      target_parameters=lora_args.target_parameters)  # fmt: skip
    inject_adapter_in_model(lora, model)
    wraps_parameters = any(hasattr(module, "parameter_name") for module in model.modules())  # peft's ParamWrapper
    return [pair.name for pair in lora_pairs(model)], wraps_parameters


def phase1_targets(args) -> tuple[list[str], str | None]:
    if args.tuner_type == "lora":
        targets = args.target_modules
        return ([targets] if isinstance(targets, str) else list(targets)), args.target_regex
    return ["all-linear"], None


def training_rows(args) -> int | None:
    """Rows of the training split as swift loads it (after --split_dataset_ratio); None when streaming."""
    if args.streaming:
        return None
    train, _ = args.load_dataset()
    return len(train) if train is not None else 0


def estimate_total_steps(args, rows: int) -> int:
    """Optimizer steps of the run as the Trainer counts them, from the number of training rows.

    Each rank gets rows // world_size rows (swift's BatchSamplerShard), a rank's dataloader has
    ceil(rows / batch) batches, an epoch ceil(batches / accumulation) steps. Rows that encoding
    drops later (too long) make the real T smaller; the capture callback checks the real T again.
    """
    import math

    batches = math.ceil(rows // world_size() / args.per_device_train_batch_size)
    per_epoch = max(math.ceil(batches / args.training_args.gradient_accumulation_steps), 1)
    return math.ceil(args.num_train_epochs * per_epoch)


def world_size() -> int:
    from swift.utils import get_dist_setting

    return max(get_dist_setting()[2], 1)


def remove_empty_output_dirs(args) -> None:
    """Undo the (empty) output folders that parsing the arguments created, after a failed check."""
    here = Path(args.output_dir)
    for folder in (here, here.parent) if args.add_version else (here,):
        try:
            folder.rmdir()
        except OSError:
            break
