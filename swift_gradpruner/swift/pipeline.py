"""The two-phase GradPruner run inside ms-swift: phase-1 LoRA probe -> prune -> the user's own run.

1. Parse the user's ``swift sft`` arguments and check everything that can be checked before a
   model is loaded (architecture, layer counts, LoRA targets, phase-1 step count).
2. Phase 1: the same run with LoRA (the user's LoRA settings, or GradPruner's when the run is not
   LoRA), on the user's data, template and schedule, stopped after t optimizer steps; an
   IGIACaptureCallback reads the LoRA gradients of every step.
3. Rank 0 reloads the base weights from disk, scores, removes and merges layers, and saves the
   pruned model with its report under ``<output_dir>/gradprune/model``. The phase-1 LoRA weights
   are discarded.
4. Phase 2: the user's run, unchanged except ``--model`` now names the pruned checkpoint, so its
   checkpoints are ordinary swift checkpoints that ``swift infer``/``swift export`` load alone.

A finished phase 1 is reused when a run is repeated (e.g. after a crash): its report carries a hash
of every setting that shapes phase 1, and a pruned model is reused only if the hash matches.
"""

from __future__ import annotations

import gc
import hashlib
import json
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..config import GradPruneConfig, GradPruneConfigError
from ..importance import IGIAAccumulator
from ..report import REPORT_NAME, read_report
from ..selection import layers_to_remove
from ..surgery import LAYERS_PREFIX, check_supported, parameter_counts
from .callback import IGIACaptureCallback
from .holdout import encode_batches, first_rows, hold_out

GRADPRUNE_DIR = "gradprune"
MODEL_DIR = "model"
PHASE1_DIR = "phase1"
HASHED_ARGS = (
    "model", "model_revision", "model_type", "template", "dataset", "split_dataset_ratio", "dataset_shuffle",
    "data_seed", "seed", "max_length", "truncation_strategy", "packing", "per_device_train_batch_size",
    "learning_rate", "lr_scheduler_type", "warmup_ratio", "warmup_steps",
    "weight_decay", "num_train_epochs", "max_steps", "max_grad_norm", "tuner_type", "lora_rank", "lora_alpha",
    "lora_dropout", "target_modules", "target_regex", "torch_dtype", "deepspeed",
)  # fmt: skip
"""SftArguments that shape phase 1 (with the resolved gradient accumulation and the world size):
a saved pruned model is reused only if none of them changed."""


def run(argv: list[str], config: GradPruneConfig) -> dict[str, Any]:
    from swift.pipelines import SwiftSft
    from swift.utils import get_logger

    logger = get_logger()
    args = parse_sft_args(argv)
    key = config_hash(args, config)
    try:
        preflight(args, config)
        if args.resume_from_checkpoint:
            pruned_dir = pruned_model_of_checkpoint(args.resume_from_checkpoint, key)
        else:
            pruned_dir = find_finished_phase1(args, key)
    except GradPruneConfigError:
        _remove_empty_output_dirs(args)
        raise
    if pruned_dir is None:
        pruned_dir = Path(args.output_dir) / GRADPRUNE_DIR / MODEL_DIR
        run_phase1_and_prune(argv, args, config, key, pruned_dir)
    else:
        logger.info(f"[GradPruner] reusing the pruned model of an earlier run with the same settings: {pruned_dir}")
    report = read_report(pruned_dir)
    logger.info(f"[GradPruner] {summary(report)}; phase 2 trains {pruned_dir}")
    phase2 = [*argv, "--model", str(pruned_dir), "--model_type", args.model_type, "--template", args.template,
              "--output_dir", args.output_dir, "--add_version", "false"]  # fmt: skip
    result = SwiftSft(parse_sft_args(phase2)).main()
    result["gradprune"] = {"pruned_model": str(pruned_dir), "report": str(pruned_dir / REPORT_NAME)}
    return result


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


def preflight(args, config: GradPruneConfig) -> None:
    """Every check that needs no model weights, so bad input fails before anything is loaded."""
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
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_config = AutoConfig.from_pretrained(args.model_dir)
    check_supported(model_config)
    # The class itself, not from_config: under ZeRO-3 from_config would initialise through DeepSpeed.
    with torch.device("meta"):
        meta = MODEL_FOR_CAUSAL_LM_MAPPING[type(model_config)](model_config)
    per_layer, total = parameter_counts(meta)
    layers_to_remove(replace(config, prune_layers=None, merge_layers=0) if config.prune_layers == "auto" else config,
                     per_layer, total)  # fmt: skip
    check_lora_targets(args, meta)
    total_steps = args.max_steps if args.max_steps and args.max_steps > 0 else None
    if total_steps is None and config.steps is not None:
        total_steps = estimate_total_steps(args)
    if total_steps is not None:
        config.phase1_steps(total_steps)


def check_lora_targets(args, meta_model) -> None:
    """Phase 1's LoRA must adapt at least one linear of a decoder layer."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    targets, regex = phase1_targets(args)
    if regex is None and "all-linear" in targets:
        return
    lora = LoraConfig(target_modules=regex or [t for t in targets if t != "all-linear"])
    linears = [n for n, m in meta_model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not any(n.startswith(LAYERS_PREFIX) and check_target_module_exists(lora, n) for n in linears):
        shown = regex or " ".join(targets)
        raise GradPruneConfigError(
            f"LoRA target modules {shown!r} match no linear layer of the model's decoder layers; its linears "
            f"are named {sorted({n.rsplit('.', 1)[-1] for n in linears})}; use --target_modules all-linear"
        )


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


def swift_version() -> str:
    from importlib.metadata import version

    return version("ms-swift")


def world_size() -> int:
    from swift.utils import get_dist_setting

    return max(get_dist_setting()[2], 1)


def phase1_settings(args) -> dict[str, str]:
    """The swift settings that shape phase 1 (HASHED_ARGS, as the trainer resolved them)."""
    settings = {name: str(getattr(args, name, None)) for name in HASHED_ARGS}
    settings["gradient_accumulation_steps"] = str(args.training_args.gradient_accumulation_steps)
    settings["world_size"] = str(world_size())
    return settings


def config_hash(args, config: GradPruneConfig) -> str:
    options = config.to_dict()
    del options["benchmark"]  # measures the result, does not shape it
    blob = json.dumps({"gradprune": options, "swift": phase1_settings(args)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def find_finished_phase1(args, key: str) -> Path | None:
    """A pruned model saved by an earlier run of the same command (same output_dir, same hash)."""
    here = Path(args.output_dir)
    candidates = [here / GRADPRUNE_DIR / MODEL_DIR]
    if args.add_version:  # earlier runs live in sibling version folders v0-..., v1-...
        siblings = here.parent.glob(f"v*/{GRADPRUNE_DIR}/{MODEL_DIR}")
        candidates += sorted(siblings, key=lambda p: p.stat().st_mtime, reverse=True)
    for candidate in candidates:
        report = read_report(candidate)
        if report and report.get("config_hash") == key and (candidate / "config.json").is_file():
            return candidate
    if read_report(candidates[0]) is not None:
        from swift.utils import get_logger

        get_logger().warning(f"[GradPruner] {candidates[0]} was made with other settings; it will be replaced")
    return None


def pruned_model_of_checkpoint(checkpoint: str, key: str) -> Path:
    """The pruned model a phase-2 checkpoint was trained on; it must come from these same settings."""
    args_file = Path(checkpoint) / "args.json"
    model = json.loads(args_file.read_text())["model"] if args_file.is_file() else None
    report = read_report(model) if model else None
    if report is None or report.get("config_hash") != key:
        raise GradPruneConfigError(
            f"--resume_from_checkpoint {checkpoint} cannot be resumed with these settings: it was trained on "
            f"{model}, which is not a GradPruner model made with the same swift and --gradprune arguments; "
            "repeat the original command's arguments, or start again without --resume_from_checkpoint"
        )
    return Path(model)


def run_phase1_and_prune(argv: list[str], args, config: GradPruneConfig, key: str, pruned_dir: Path) -> None:
    from swift.utils import get_logger, is_master

    logger = get_logger()
    phase1_dir = pruned_dir.parent / PHASE1_DIR
    accumulator = IGIAAccumulator(keep_factors=is_master())
    phase1_args = parse_sft_args(phase1_argv(argv, args, config, phase1_dir))
    phase1 = _phase1_pipeline_class()(phase1_args, config, accumulator)
    phase1.main()
    capture = phase1.capture
    phase1_info = {
        "phase1": {
            "steps_planned": capture.steps,
            "steps_captured": capture.captured,
            "total_steps": capture.total_steps,
            "lora_rank": phase1.args.lora_rank,
            "lora_alpha": phase1.args.lora_alpha,
            "target_modules": phase1.args.target_modules,
            "learning_rate": phase1.args.learning_rate,
            "deepspeed": bool(args.deepspeed),
            "world_size": world_size(),
            "output_dir": str(phase1_dir),
        },
        "config_hash": key,
        "source_model": args.model_dir,
        "swift_settings": phase1_settings(args),
    }
    held_out = {"guard": phase1.guard, "calibration": phase1.calibration}
    del phase1, capture
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if is_master():
        swift_args = {"swift_version": swift_version(), "model": str(pruned_dir), "model_type": args.model_type,
                      "template": args.template, "task_type": "causal_lm", "tuner_type": "full"}  # fmt: skip
        prune_checkpoint(args.model_dir, accumulator, config, pruned_dir, phase1_info, swift_args, **held_out)
    del accumulator
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    logger.info(f"[GradPruner] pruned model saved: {pruned_dir}")


def prune_checkpoint(model_dir: str, accumulator: IGIAAccumulator, config: GradPruneConfig, out_dir: Path,
                     extra: dict[str, Any], swift_args: dict[str, Any],
                     guard=None, calibration=None) -> None:  # fmt: skip
    """Load the base checkpoint in its own dtype, prune and merge it, save it with its report.

    The model runs on the GPU when there is one and it fits (forward passes of the guard and the
    criteria, the merge, the timing), else on the CPU. ``swift_args`` becomes the checkpoint's
    args.json, from which ``swift infer --model`` and ``swift export`` take model_type and template
    (``swift sft`` ignores it: load_args is off there). ``guard`` and ``calibration`` are encoded
    batches of held-out and of training rows (holdout.py).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..prune import prune_model, save_pruned

    with _zero3_init_off():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", device_map="cpu")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _onto(model, device)
    result = prune_model(model, accumulator, config, calibration=calibration, guard=guard, device=device, extra=extra)
    if result.guard is not None and not result.guard.ok:
        from swift.utils import get_logger

        get_logger().warning(f"[GradPruner] WARNING: {result.guard.message(len(result.plan.removed))}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    save_pruned(model, result, out_dir, tokenizer=tokenizer, overwrite=True, extra_files={"args.json": swift_args})


def _onto(model, device: str):
    """``model`` on ``device`` if it fits there, else where it is."""
    if device == "cpu":
        return model
    try:
        return model.to(device)
    except torch.OutOfMemoryError:
        model.to("cpu")
        torch.cuda.empty_cache()
        return model


@contextmanager
def _zero3_init_off():
    """Load a whole model on one rank even inside a ZeRO-3 run (transformers would partition it)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def phase1_argv(argv: list[str], args, config: GradPruneConfig, out_dir: Path) -> list[str]:
    """The user's arguments turned into phase 1: plain LoRA, no saving, evaluation or resuming."""
    dropped = {"--resume_from_checkpoint", "--resume_only_model"}
    if args.tuner_type != "lora":
        dropped |= {"--target_modules", "--target_regex"}
    argv = drop_flags(argv, dropped)
    overrides = {
        "tuner_type": "lora", "use_dora": "false", "output_dir": str(out_dir), "add_version": "false",
        "save_strategy": "no", "eval_strategy": "no", "load_best_model_at_end": "false", "report_to": "none",
        "push_to_hub": "false", "create_checkpoint_symlink": "false", "model_type": args.model_type,
        "template": args.template,
    }  # fmt: skip
    if args.tuner_type != "lora":
        overrides.update(
            lora_rank=str(config.lora_rank), lora_alpha=str(config.lora_alpha), target_modules="all-linear"
        )
    extra = [token for key, value in overrides.items() for token in (f"--{key}", value)]
    return [*argv, *extra]


def drop_flags(argv: list[str], flags: set[str]) -> list[str]:
    """``argv`` without the given flags and their values."""
    out, skipping = [], False
    for token in argv:
        if token.startswith("--"):
            skipping = token.split("=", 1)[0] in flags
            if skipping:
                continue
        elif skipping:
            continue
        out.append(token)
    return out


def summary(report: dict[str, Any]) -> str:
    merged = ", ".join(f"{k}->{v}" for k, v in report["merged_layers"].items()) or "none"
    before, after = report["num_layers_before"], report["num_layers_after"]
    text = (
        f"removed {before - after} of {before} layers (dropped {report['dropped_layers']}, merged {merged}); "
        f"parameters {report['params_before']:,} -> {report['params_after']:,} "
        f"(-{report['params_removed_fraction']:.1%} of all, -{report['decoder_params_removed_fraction']:.1%} of the "
        "decoder layers)"
    )
    guard = report.get("quality_guard")
    if guard:
        verdict = "" if guard["ok"] else f", OVER the +{guard['threshold']:.0%} threshold"
        text += (
            f"; loss on {guard['rows']} held-out rows {guard['dense_loss']:.3f} dense -> {guard['pruned_loss']:.3f} "
            f"pruned ({guard['increase']:+.0%}{verdict})"
        )
    timing = report.get("inference_benchmark", {})
    if "prefill_speedup" in timing:
        text += (
            f"; inference on {timing['device']}: prefill {timing['prefill_speedup']:.2f}x, "
            f"generation {timing['generate_speedup']:.2f}x faster than dense"
        )
    return text


def _phase1_pipeline_class():
    from swift.pipelines import SwiftSft

    class GradPrunePhase1(SwiftSft):
        """SwiftSft that adds the gradient-capture callback to its trainer."""

        def __init__(self, args, config: GradPruneConfig, accumulator: IGIAAccumulator) -> None:
            self.gradprune_config = config
            self.accumulator = accumulator
            self.capture = None
            self.held_out = None
            self.train_rows = None
            self.guard: list | None = None
            self.calibration: list | None = None
            super().__init__(args)

        def _get_dataset(self):
            from swift.utils import get_logger

            train, val = super()._get_dataset()
            rows = self.gradprune_config.guard_rows
            train, self.held_out = hold_out(train, rows, self.args.data_seed)
            self.train_rows = train
            if rows and self.held_out is None:
                get_logger().warning(
                    f"[GradPruner] quality guard off: it needs an in-memory training set of at least {4 * rows} rows "
                    "(not streaming) to hold out --gradprune_guard_rows of them"
                )
            return train, val

        def train(self, trainer):
            from swift.utils import is_master

            if is_master():
                batch = self.args.per_device_train_batch_size
                if self.held_out is not None:
                    self.guard = encode_batches(self.template, list(self.held_out), batch)
                if self.gradprune_config.needs_calibration:
                    rows = first_rows(self.train_rows, self.gradprune_config.calibration_rows, self.args.data_seed)
                    self.calibration = encode_batches(self.template, rows, batch)
            self.capture = IGIACaptureCallback(
                trainer, self.gradprune_config.phase1_steps, self.accumulator, accumulate=is_master()
            )
            trainer.add_callback(self.capture)
            try:
                return super().train(trainer)
            finally:
                self.capture.trainer = None

    return GradPrunePhase1


def _remove_empty_output_dirs(args) -> None:
    """Undo the (empty) output folders that parsing the arguments created, after a failed check."""
    here = Path(args.output_dir)
    for folder in (here, here.parent) if args.add_version else (here,):
        try:
            folder.rmdir()
        except OSError:
            break
