"""Everything about a ``swift sft --gradprune`` run that can be checked before a model is loaded."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..architecture import auto_class, check_supported, layers_prefix, parameter_counts
from ..config import IGIA_SCORES, GradPruneConfig, GradPruneConfigError
from ..coverage import check_igia_comparable
from ..selection import layers_to_remove

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


def preflight(args, config: GradPruneConfig) -> bool:
    """Every check that needs no model weights, so bad input fails before anything is loaded.

    Returns whether phase 1's LoRA wraps fused expert parameters (then a non-LoRA run's phase 1 uses
    ``--lora_dropout 0``)."""
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
    if config.needs_calibration and args.streaming:
        raise GradPruneConfigError(
            f"--gradprune_score {config.score} runs the model on calibration rows, which a --streaming dataset "
            "cannot provide before training; use --streaming false or --gradprune_score squared"
        )
    if args.adapters:
        raise GradPruneConfigError(
            "--adapters cannot be combined with --gradprune: adapters trained on the dense model do not fit "
            "the pruned one; merge them first (swift export --merge_lora true) and prune the merged model"
        )
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(args.model_dir)
    check_supported(model_config)
    meta = meta_model(model_config)
    per_layer, total = parameter_counts(meta)
    layers_to_remove(replace(config, prune_layers=None, merge_layers=0) if config.prune_layers == "auto" else config,
                     per_layer, total)  # fmt: skip
    check_lora_targets(args, meta)
    names, wraps_parameters = phase1_lora(args, model_config)
    if wraps_parameters and args.tuner_type == "lora" and args.lora_dropout:
        raise GradPruneConfigError(
            f"--lora_dropout {args.lora_dropout}: your LoRA targets reach this model's fused expert weights, which "
            "peft wraps with ParamWrapper, and ParamWrapper refuses dropout (phase 1 and your own run would both "
            "fail after loading the model); pass --lora_dropout 0"
        )
    if config.score in IGIA_SCORES:
        check_igia_comparable(meta, names, config.score)
    total_steps = args.max_steps if args.max_steps and args.max_steps > 0 else None
    if total_steps is None and config.steps is not None:
        total_steps = estimate_total_steps(args)
    if total_steps is not None:
        config.phase1_steps(total_steps)
    return wraps_parameters


def check_lora_targets(args, meta_model) -> None:
    """Phase 1's LoRA must adapt at least one linear of a decoder layer."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    targets, regex = phase1_targets(args)
    if regex is None and "all-linear" in targets:
        return
    lora = LoraConfig(target_modules=regex or [t for t in targets if t != "all-linear"])
    linears = [n for n, m in meta_model.named_modules() if isinstance(m, torch.nn.Linear)]
    prefix = layers_prefix(meta_model)
    if not any(n.startswith(prefix) and check_target_module_exists(lora, n) for n in linears):
        shown = regex or " ".join(targets)
        raise GradPruneConfigError(
            f"LoRA target modules {shown!r} match no linear layer of the model's decoder layers; its linears "
            f"are named {sorted({n.rsplit('.', 1)[-1] for n in linears})}; use --target_modules all-linear"
        )


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


def estimate_total_steps(args) -> int:
    """Optimizer steps of the run as the Trainer counts them, from the raw training set.

    Each rank gets rows // world_size rows (swift's BatchSamplerShard), a rank's dataloader has
    ceil(rows / batch) batches, an epoch ceil(batches / accumulation) steps. Rows that encoding
    drops later (too long) make the real T smaller; the capture callback checks the real T again.
    """
    import math

    train, _ = args.load_dataset()
    batches = math.ceil(len(train) // world_size() / args.per_device_train_batch_size)
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
