"""``gradprune sft ...``: ``swift sft`` with GradPruner, without the start-up hook.

``gradprune sft`` hands its arguments to ms-swift's own ``cli_main`` with a route that points
``sft`` at this file (the way swift builds its ``megatron`` command), so YAML configs are expanded
and NPROC_PER_NODE / NNODES launch torchrun exactly as for ``swift sft``; each process then runs
this file, which runs swift's sft pipeline through GradPruner. GradPruner is on unless
``--gradprune false`` is given.
"""

import sys


def launch(argv: list[str]) -> None:
    """Run ``swift sft <argv>`` through swift's launcher with GradPruner's sft entry (the parent process)."""
    from swift.cli.main import cli_main

    saved = sys.argv
    sys.argv = ["gradprune", "sft", *argv]
    try:
        cli_main({"sft": "swift_gradpruner.swift.sft_cli"})
    finally:
        sys.argv = saved


def main() -> None:
    """One training process (the child that swift's launcher starts)."""
    from swift.cli.utils import try_use_single_device_mode

    try_use_single_device_mode()
    from swift.pipelines import sft_main

    from swift_gradpruner.swift.entry import wrap_sft_main

    wrap_sft_main(sft_main, sys.argv[1:], on_by_default=True)()


if __name__ == "__main__":
    main()
