"""Helpers for tests that run the real ``swift`` CLI in a subprocess, as a user would."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from swift_gradpruner.demo import offline_env, swift_command

TESTS = Path(__file__).parent
COMMON = [
    "--template", "chatml", "--torch_dtype", "float32", "--fp16", "false", "--dataloader_num_workers", "0",
    "--report_to", "none", "--check_model", "false", "--logging_steps", "1", "--seed", "42",
]  # fmt: skip


def swift(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``swift <args>``; the result's ``output`` attribute holds stdout and stderr together."""
    proc = subprocess.run(
        [*swift_command(), *args],
        cwd=cwd,
        env={**offline_env(), "MASTER_PORT": "29571", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    proc.output = proc.stdout
    return proc


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.output[-6000:]
    return proc


def run_dir(output_dir: Path) -> Path:
    """The newest version folder (v0-..., v1-...) swift made under ``output_dir``."""
    return max(output_dir.glob("v*-*"), key=lambda p: p.name.split("-")[0][1:].zfill(6))


def report_of(output_dir: Path) -> dict:
    return json.loads((run_dir(output_dir) / "gradprune" / "model" / "gradprune_report.json").read_text())


def logged_losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "logging.jsonl").read_text().splitlines()]
    return [float(r["loss"]) for r in rows if "loss" in r]
