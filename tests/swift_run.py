"""Helpers for tests that run the real ``swift`` CLI in a subprocess, as a user would."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

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
        env={**offline_env(), "MASTER_PORT": str(free_port()), **(env or {})},  # tests may run side by side
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


def assert_same_scores(report: dict, expected: dict) -> None:
    assert report["steps"] == expected["steps"]
    assert report["layer_scores"] == pytest.approx(expected["layer_scores"], rel=1e-5)
    for name, value in expected["linear_scores"].items():
        assert report["linear_scores"][name] == pytest.approx(value, rel=1e-5), name
    assert (report["dropped_layers"], report["merged_layers"]) == (
        expected["dropped_layers"],
        expected["merged_layers"],
    )


def zero3_config_for_cpu(folder: Path) -> Path:
    """swift's zero3.json without train_batch_size: on CPU, zero.Init builds its config before the
    process group exists, sees world size 1 and would otherwise fail DeepSpeed's batch-size check."""
    import swift

    config = json.loads((Path(swift.__file__).parent / "config" / "zero3.json").read_text())
    config.pop("train_batch_size", None)
    path = folder / "zero3_cpu.json"
    path.write_text(json.dumps(config))
    return path


def start_swift(*args: str, cwd: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start ``swift <args>`` in the background, its stdout and stderr going to ``log``."""
    with log.open("w") as out:
        return subprocess.Popen(
            [*swift_command(), *args], cwd=cwd, env={**offline_env(), **(env or {})}, stdout=out,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
