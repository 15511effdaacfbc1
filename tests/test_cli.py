"""The `gradprune` command as a new user meets it: every subcommand's --help."""

import subprocess
import sys

import pytest

from swift_gradpruner.cli import main

SUBCOMMANDS = ["demo", "tiny", "flags", "models", "eval", "prune", "bench"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_help_works(command, capsys):
    """Issue 18 item 13: `gradprune prune --help` crashed on a '%' in a flag's help text."""
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: gradprune {command}")


def test_top_level_and_sft_help_work():
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    # `gradprune sft` hands everything to swift's launcher; its --help is swift's own (a subprocess).
    proc = subprocess.run([sys.executable, "-m", "swift_gradpruner.cli", "sft", "--help"], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--gradprune" not in proc.stderr and "--model" in proc.stdout
