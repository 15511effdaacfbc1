"""Issue 24: the multi-rank runs users type, on two CPU ranks (gloo).

{plain DDP, ZeRO-2, ZeRO-3} x {the default criterion, the paper's method (squared IGIA + a merge)} x
{--max_steps, --num_train_epochs}, plus prune_layers=auto: every run finishes, every rank reports the
layers a one-process run of the same recipe chooses, and phase 2 writes its checkpoint. The default
criterion has no phase 1, so rank 0 alone loads and encodes the held-out rows (and, with epochs, counts
the training rows) while the other ranks wait; before issue 24 swift's dataset barriers hung it.

One torchrun launch per backend runs its cells one after another (tests/multirank_cells.py), and one
process runs the references: a process start per backend, not per cell. The ZeRO-3 paper cells use the
README's 70B recipe (no guard rows, no timing: streaming surgery on rank 0 under ZeRO-3).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from swift_gradpruner.demo import offline_env
from swift_gradpruner.tiny import create_tiny
from swift_run import COMMON, TESTS, free_port, zero3_config_for_cpu

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"),
]
TIMEOUT_S = 1500
PAPER = ("--gradprune_score", "squared", "--gradprune_merge_layers", "1")
STREAMING = ("--gradprune_guard_rows", "0", "--gradprune_benchmark", "false")
SCHEDULES = {"steps": ("--max_steps", "8", "--save_steps", "8"), "epochs": ("--num_train_epochs", "1")}


def recipe(kind: str, schedule: str, streaming: bool = False) -> tuple[str, ...]:
    method = {"default": (), "paper": PAPER, "auto": ("--gradprune_prune_layers", "auto")}[kind]
    count = () if kind == "auto" else ("--gradprune_prune_layers", "2")
    guard = STREAMING if streaming else ("--gradprune_guard_rows", "4")
    return (*count, *method, *SCHEDULES[schedule], *guard)


CELLS = {  # name: (kind, schedule, streaming)
    "default_steps": ("default", "steps", False),
    "default_epochs": ("default", "epochs", False),
    "paper_steps": ("paper", "steps", False),
    "paper_epochs": ("paper", "epochs", False),
}
STREAMING_CELLS = {
    "paper_steps_streaming": ("paper", "steps", True),
    "paper_epochs_streaming": ("paper", "epochs", True),
}
AUTO_CELLS = {"auto_epochs": ("auto", "epochs", False)}
BACKENDS = {  # backend: the cells its two-rank launch runs
    "ddp": {**CELLS, **AUTO_CELLS},
    "zero2": CELLS,
    "zero3": {name: cell for name, cell in {**CELLS, **STREAMING_CELLS}.items() if not name.startswith("paper_")
              or name.endswith("_streaming")},  # fmt: skip
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("multirank")
    model, data = create_tiny(root / "llama", "llama", num_layers=6, rows=64)
    return root, model, data


def launch(tiny, name: str, cells: dict, ranks: int, backend: str | None) -> tuple[dict, str]:
    """Run ``cells`` in one launch of ``ranks`` processes; ({(cell, rank): row}, the launch's output)."""
    root, model, data = tiny
    deepspeed = {None: (), "ddp": (), "zero2": ("--deepspeed", "zero2"),
                 "zero3": ("--deepspeed", str(zero3_config_for_cpu(root)))}[backend]  # fmt: skip
    accumulation = "2" if ranks == 1 else "1"  # the same 4 rows per optimizer step either way
    argvs = {
        cell: ["--model", str(model), "--model_type", "llama", "--dataset", str(data), *COMMON, "--tuner_type", "lora",
               "--lora_dropout", "0", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps",
               accumulation, "--use_cpu", "true", "--output_dir", str(root / name / cell), *deepspeed,
               *recipe(*spec)]  # fmt: skip
        for cell, spec in cells.items()
    }
    cells_file, out_file = root / f"{name}.json", root / f"{name}.jsonl"
    cells_file.write_text(json.dumps(argvs))
    out_file.unlink(missing_ok=True)
    runner = [str(TESTS / "multirank_cells.py"), str(cells_file), str(out_file)]
    if ranks > 1:
        runner = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(free_port()),
                  *runner]  # fmt: skip
    proc = subprocess.run([sys.executable, *runner], cwd=root, env={**offline_env(), "OMP_NUM_THREADS": "1"},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S)  # fmt: skip
    (root / f"{name}.log").write_text(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-6000:]
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    return {(row["cell"], row["rank"]): row for row in rows}, proc.stdout


@pytest.fixture(scope="module")
def references(tiny) -> dict:
    """Every cell of every backend, run by one process alone."""
    rows, _ = launch(tiny, "one_process", {**CELLS, **STREAMING_CELLS, **AUTO_CELLS}, ranks=1, backend=None)
    return {cell: row for (cell, _), row in rows.items()}


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_two_ranks_choose_the_layers_of_one_process_and_train_them(tiny, references, backend):
    rows, output = launch(tiny, backend, BACKENDS[backend], ranks=2, backend=backend)
    for cell, (kind, _, streaming) in BACKENDS[backend].items():
        alone = references[cell]
        assert "error" not in alone, alone
        for rank in (0, 1):
            row = rows[cell, rank]
            assert "error" not in row, (cell, rank, row)
            # Every rank trains the pruned model rank 0 made: the layers a one-process run chooses.
            assert (row["dropped"], row["merged"]) == (alone["dropped"], alone["merged"]), (cell, rank)
            assert row["pruned_model"] == rows[cell, 0]["pruned_model"]
        assert rows[cell, 0]["layer_scores"] == pytest.approx(alone["layer_scores"], rel=1e-5), cell
        checkpoint = Path(rows[cell, 0]["checkpoint"])
        assert (checkpoint / "adapter_model.safetensors").is_file(), cell
        assert json.loads((checkpoint / "args.json").read_text())["model"] == rows[cell, 0]["pruned_model"]
        phase1 = rows[cell, 0]["phase1"]
        if kind == "paper":
            assert phase1["world_size"] == 2 and phase1["deepspeed"] is (backend != "ddp"), cell
        else:
            assert phase1 is None, cell  # no phase 1: rank 0 prepared the rows alone
        assert rows[cell, 0]["timed"] is not streaming, cell  # rank 0 timed dense vs pruned while rank 1 waited
    if backend == "zero3":
        # Rank 0 builds its meta model outside deepspeed.zero.Init, which rank 1 never joins.
        assert output.count("streaming surgery") == len(STREAMING_CELLS), output[-4000:]
    if backend == "ddp":
        # auto chose its count on the guard rows (rank 0) and every rank trained that many layers fewer.
        assert rows["auto_epochs", 1]["layers_after"] == references["auto_epochs"]["layers_after"] < 6


def test_a_failure_of_rank_0_while_deciding_stops_both_ranks_with_one_line(tiny, tmp_path):
    """Issue 24 item 3, as typed: with the default criterion rank 0 alone loads and encodes the held-out rows
    while deciding; a dataset file it cannot parse (a write cut short) fails there, and both ranks stop
    with the same line instead of rank 1 waiting forever in the broadcast (the subprocess timeout is the
    bound)."""
    from swift_run import swift

    root, model, data = tiny
    out = root / "broken"
    broken = tmp_path / "cut.jsonl"
    broken.write_text(data.read_text()[:-40])  # the last row cut in the middle
    proc = swift("sft", "--model", str(model), "--model_type", "llama", "--dataset", str(broken), *COMMON,
                 "--tuner_type", "lora", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                 "--use_cpu", "true", "--output_dir", str(out), "--add_version", "false", "--num_train_epochs", "1",
                 "--gradprune", "true", cwd=root, env={"NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())},
                 timeout=300)  # fmt: skip
    assert proc.returncode != 0, proc.output[-4000:]
    errors = {line for line in proc.output.splitlines() if line.startswith("[GradPruner] error:")}
    assert len(errors) == 1, proc.output[-4000:]
    assert errors.pop().startswith("[GradPruner] error: reading the training rows failed: "), proc.output[-4000:]
