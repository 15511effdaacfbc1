"""Entry points: the wrapped ``sft_main`` that ``swift sft --gradprune true`` runs, and the Python API."""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib.metadata import version

from ..config import GradPruneConfig, GradPruneConfigError
from .args import RAY_REFUSED, parse_gradprune, split_argv

SUPPORTED_SWIFT = ("4.6",)
"""ms-swift minor versions whose trainer and pipeline internals this adapter was verified against."""


def check_swift_version() -> None:
    installed = version("ms-swift")
    if not installed.startswith(SUPPORTED_SWIFT):
        raise GradPruneConfigError(
            f"swift-gradpruner supports ms-swift {', '.join(v + '.x' for v in SUPPORTED_SWIFT)}, but "
            f"ms-swift {installed} is installed: pip install 'ms-swift>=4.6,<4.7' or drop --gradprune"
        )


def wrap_sft_main(stock_sft_main: Callable, argv: list[str], on_by_default: bool = False) -> Callable:
    """``sft_main`` for a ``swift sft`` process started with ``--gradprune*`` flags in ``argv``.

    The installed ms-swift version is checked first. Bad GradPruner input ends the process with one
    line on stderr, before any model is loaded. ``on_by_default``: GradPruner runs unless
    ``--gradprune false`` (the ``gradprune sft`` command).
    """

    def sft_main(args=None):
        try:
            check_swift_version()
            raw, rest = split_argv(list(argv))
            if on_by_default:
                raw.setdefault("gradprune", "true")
            enabled, config = parse_gradprune(raw)
            if not enabled:
                if len(raw) > 1:
                    print(f"[GradPruner] --gradprune is off: ignoring {sorted(raw)}", file=sys.stderr)
                return stock_sft_main(rest if args is None else args)
            result = gradprune_sft_main(rest if args is None else args, config)
            from .distributed import finish

            finish()  # the process ends here: its process group goes first
            return result
        except GradPruneConfigError as error:
            raise SystemExit(f"[GradPruner] error: {error}") from None

    return sft_main


def refuse_ray(stock_try_init_ray: Callable, argv: list[str]) -> Callable:
    """swift's ``try_init_ray`` for a ``swift sft`` process started with ``--gradprune*`` flags: with
    GradPruner on, ``--use_ray`` ends the process with one line before Ray starts."""

    def try_init_ray():
        try:
            raw, rest = split_argv(list(argv))
            enabled = parse_gradprune(raw)[0]
        except GradPruneConfigError:
            enabled = False  # the wrapped sft_main reports the bad flag
        if enabled and _flag_true(rest, "--use_ray"):
            raise SystemExit(f"[GradPruner] error: {RAY_REFUSED}")
        return stock_try_init_ray()

    return try_init_ray


def _flag_true(argv: list[str], flag: str) -> bool:
    """Whether ``flag`` is given a true value (``--flag 1``, ``--flag=true``) in ``argv``."""
    for i, token in enumerate(argv):
        key, eq, value = token.partition("=")
        if key == flag:
            value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            return value.strip().lower() in {"1", "true", "yes", "y", "on"}
    return False


def gradprune_sft_main(args: list[str] | None = None, config: GradPruneConfig | None = None):
    """Run ``swift sft`` with GradPruner from Python.

    ``args`` is the list of swift arguments (default ``sys.argv[1:]``); the GradPruner options come
    from ``config`` or, if it is None, from ``--gradprune_*`` flags among ``args``. Returns swift's
    result dict for the phase-2 run plus a ``gradprune`` entry (pruned model dir and report).
    Raises GradPruneConfigError for bad input, before any model is loaded.
    """
    if args is None:
        args = sys.argv[1:]
    if config is None:
        raw, args = split_argv(list(args))
        config = parse_gradprune({**raw, "gradprune": "true"})[1]
    check_swift_version()
    from .pipeline import run

    return run(list(args), config)
