"""The ``--gradprune`` / ``--gradprune_<option>`` command-line flags of ``swift sft`` (no swift import).

ms-swift parses its arguments with HfArgumentParser, which rejects unknown flags and accepts unique
prefixes of known ones. The GradPruner flags are therefore taken out of the argument list before
swift sees it, and matched exactly here: a misspelt ``--gradprune_prune_layer`` is an error naming
the valid flags, never a silent prefix match.
"""

from __future__ import annotations

import types
import typing
from dataclasses import fields

from ..config import GradPruneConfig, GradPruneConfigError

FLAG = "--gradprune"
TRUE = {"true", "1", "yes", "y", "on"}
FALSE = {"false", "0", "no", "n", "off"}
RAY_REFUSED = (
    "--use_ray is not supported with --gradprune: GradPruner runs its phases in the training processes "
    "that swift starts; launch without Ray (torchrun: NPROC_PER_NODE / NNODES)"
)


def is_gradprune_token(token: str) -> bool:
    return token == FLAG or token.startswith((FLAG + "_", FLAG + "="))


def split_argv(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Take the GradPruner flags out of ``argv``: ({option: raw value}, the other arguments in order).

    ``--gradprune`` alone means true; every other flag needs a value (``--flag v`` or ``--flag=v``).
    """
    ours: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if not is_gradprune_token(token):
            rest.append(token)
            i += 1
            continue
        key, eq, value = token[2:].partition("=")
        if not eq:
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            if has_value:
                value = argv[i + 1]
                i += 1
            elif key == "gradprune":
                value = "true"
            else:
                raise GradPruneConfigError(f"--{key} needs a value, e.g. --{key} {_example(key)}")
        if key in ours:
            raise GradPruneConfigError(f"--{key} is given twice ({ours[key]!r} and {value!r}); keep one")
        ours[key] = value
        i += 1
    return ours, rest


def parse_gradprune(raw: dict[str, str]) -> tuple[bool, GradPruneConfig]:
    """(whether GradPruner is on, its validated config) from the flags ``split_argv`` took out."""
    enabled = _to_bool("gradprune", raw.get("gradprune", "false"))
    options = typing.get_type_hints(GradPruneConfig)
    values = {}
    for key, text in raw.items():
        if key == "gradprune":
            continue
        name = key[len("gradprune_") :]
        if name not in options:
            valid = ", ".join(f"--gradprune_{n}" for n in options)
            raise GradPruneConfigError(f"unknown flag --{key}; valid GradPruner flags: --gradprune, {valid}")
        values[name] = _convert(key, text, options[name])
    return enabled, GradPruneConfig(**values)


def flag_help() -> list[tuple[str, str, str]]:
    """(flag, default, help) of every GradPruner flag, for docs/options.md and ``gradprune flags``."""
    rows = [(FLAG, "false", "Turn GradPruner on for this swift sft run.")]
    for f in fields(GradPruneConfig):
        default = str(f.default).lower() if isinstance(f.default, bool) else str(f.default)
        rows.append((f"{FLAG}_{f.name}", default, f.metadata["help"]))
    return rows


def _convert(key: str, text: str, annotation) -> object:
    kinds = _kinds(annotation)
    if bool in kinds:
        return _to_bool(key, text)
    if text.strip().lower() in {"none", "null", ""} and type(None) in kinds:
        return None
    for kind in (int, float, str):
        if kind in kinds:
            try:
                return kind(text)
            except ValueError:
                continue
    expected = " or ".join(k.__name__ for k in kinds if k is not type(None))
    raise GradPruneConfigError(f"--{key} {text!r} is not a valid {expected}, e.g. --{key} {_example(key)}")


def _kinds(annotation) -> tuple[type, ...]:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return (annotation,)


def _to_bool(key: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in TRUE:
        return True
    if lowered in FALSE:
        return False
    raise GradPruneConfigError(f"--{key} {text!r} is not true or false: write --{key} true or --{key} false")


def _example(key: str) -> str:
    name = key[len("gradprune_") :]
    defaults = {f.name: f.default for f in fields(GradPruneConfig)}
    examples = {"prune_layers": 13, "prune_ratio": 0.4, "steps": 40, "gradprune": "true"}
    return str(examples.get(name, examples.get(key, defaults.get(name))))
