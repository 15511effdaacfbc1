"""The ``gradprune`` command: the offline demo, tiny test models, and the list of GradPruner flags."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
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
    args = parser.parse_args(argv)

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


if __name__ == "__main__":
    sys.exit(main())
