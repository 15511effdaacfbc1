"""Two "nodes" on localhost, launched the way swift's docs launch a multi-node run:
``NNODES=2 NODE_RANK=0|1 MASTER_ADDR=127.0.0.1 MASTER_PORT=<port> NPROC_PER_NODE=1 swift sft ...``,
one process each, gloo on CPU (`pytest -k multinode`).

* same scores and pruned layers as one process seeing the same global batch, the pruned model
  written once (by rank 0), and both nodes' phase 2 training it;
* a node that dies during phase 1 ends the other node's run with an error within a bounded time;
* nodes that do not share --output_dir stop before phase 1 with a one-line error.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from pathlib import Path

import psutil
import pytest

from swift_gradpruner.tiny import create_tiny
from swift_run import (
    COMMON,
    assert_same_scores,
    check,
    free_port,
    report_of,
    run_dir,
    start_swift,
    swift,
    zero3_config_for_cpu,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"),
]
SAVING = "[GradPruner] saving the pruned model to"
TIMEOUT_S = 900


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("multinode")
    model, data = create_tiny(root / "llama", "llama", num_layers=6, rows=128)
    return root, model, data


def sft_args(tiny, out: Path, *extra: str, steps: int = 6, capture: int = 4, accumulation: int = 1) -> list[str]:
    root, model, data = tiny
    return [
        "sft", "--model", str(model), "--model_type", "llama", "--dataset", str(data), *COMMON,
        "--tuner_type", "lora", "--lora_dropout", "0", "--max_steps", str(steps), "--save_steps", str(steps),
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", str(accumulation),
        "--output_dir", str(out), "--gradprune", "true", "--gradprune_prune_layers", "2",
        "--gradprune_merge_layers", "1", "--gradprune_steps", str(capture), *extra,
    ]  # fmt: skip


def default_args(tiny, out: Path, *extra: str, accumulation: int = 1) -> list[str]:
    """The run a user types with the defaults (Block Influence: no phase 1) and epochs, not --max_steps."""
    root, model, data = tiny
    return [
        "sft", "--model", str(model), "--model_type", "llama", "--dataset", str(data), *COMMON,
        "--tuner_type", "lora", "--num_train_epochs", "1", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", str(accumulation), "--output_dir", str(out), "--gradprune", "true",
        "--gradprune_prune_layers", "2", *extra,
    ]  # fmt: skip


def start_nodes(tiny, name: str, outputs: list[Path], *extra: str, args_of=sft_args,
                **kwargs) -> tuple[list, list[Path]]:  # fmt: skip
    """Start node 0 and node 1 (one process each) with their own --output_dir; return (processes, logs)."""
    root = tiny[0]
    port = str(free_port())
    procs, logs = [], []
    for node, out in enumerate(outputs):
        env = {"NNODES": "2", "NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "NPROC_PER_NODE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
        log = root / f"{name}_node{node}.log"
        procs.append(start_swift(*args_of(tiny, out, "--use_cpu", "true", *extra, **kwargs), cwd=root, log=log,
                                 env=env))  # fmt: skip
        logs.append(log)
    return procs, logs


def kill_tree(proc) -> None:
    """Kill a launched node: the swift CLI, torchrun's agent and its worker (as if the machine died)."""
    try:
        parent = psutil.Process(proc.pid)
    except psutil.NoSuchProcess:
        return
    for p in [parent, *parent.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait(timeout=60)


@pytest.fixture
def nodes(tiny):
    started = []

    def start(*args, **kwargs):
        procs, logs = start_nodes(tiny, *args, **kwargs)
        started.extend(procs)
        return procs, logs

    yield start
    for proc in started:  # nothing outlives a failed test
        kill_tree(proc)


@pytest.fixture(scope="module")
def one_process(tiny) -> dict:
    """The reference: one process, accumulation 2, i.e. the same 4 rows per optimizer step as 2 nodes x 2."""
    out = tiny[0] / "one_process"
    check(swift(*sft_args(tiny, out, accumulation=2), cwd=tiny[0], env={"NPROC_PER_NODE": "1"}))
    return report_of(out)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_multinode_run_matches_one_process_and_writes_the_model_once(tiny, nodes, one_process, stage):
    out = tiny[0] / f"shared_{stage}"
    deepspeed = stage if stage == "zero2" else str(zero3_config_for_cpu(tiny[0]))
    procs, logs = nodes(f"shared_{stage}", [out, out], "--deepspeed", deepspeed)
    codes = [proc.wait(timeout=TIMEOUT_S) for proc in procs]
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], [text[-4000:] for text in texts]
    report = report_of(out)
    assert report["phase1"]["world_size"] == 2 and report["phase1"]["deepspeed"] is True
    assert_same_scores(report, one_process)
    # One pruned model, written by rank 0 alone; no marker of the shared-folder check left behind.
    run = run_dir(out)
    pruned = run / "gradprune" / "model"
    assert [texts[0].count(SAVING), texts[1].count(SAVING)] == [1, 0]
    assert list(out.glob("v*/gradprune/model")) == [pruned]
    assert not list(run.glob(".gradprune_shared_*"))
    # Node 1 loaded the pruned model for phase 2 and both phases ended there too; phase 2 reached its last step.
    assert f"model_dir='{pruned}'" in texts[1]
    assert texts[1].count("End time of running main") == 2
    assert (run / "checkpoint-6" / "adapter_model.safetensors").is_file()


def test_multinode_default_run_with_epochs_matches_one_process(tiny, nodes):
    """Issue 24: the default criterion has no phase 1, so rank 0 alone loads and encodes the rows (and,
    with epochs, counts them) while node 1 waits; swift's dataset barriers once hung exactly this run."""
    out = tiny[0] / "default_epochs"
    procs, logs = nodes("default_epochs", [out, out], args_of=default_args)
    codes = [proc.wait(timeout=TIMEOUT_S) for proc in procs]
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], [text[-4000:] for text in texts]
    alone = tiny[0] / "default_epochs_alone"
    check(swift(*default_args(tiny, alone, accumulation=2), cwd=tiny[0], env={"NPROC_PER_NODE": "1"}))
    report, reference = report_of(out), report_of(alone)
    assert report["phase1"] is None  # no phase 1: rank 0 prepared the rows alone
    for name in ("dropped_layers", "merged_layers"):
        assert report[name] == reference[name], name
    assert report["layer_scores"] == pytest.approx(reference["layer_scores"], rel=1e-5)
    assert report["quality_guard"]["rows"] == reference["quality_guard"]["rows"] > 0
    run = run_dir(out)
    assert [texts[0].count(SAVING), texts[1].count(SAVING)] == [1, 0]
    assert f"model_dir='{run / 'gradprune' / 'model'}'" in texts[1]  # node 1 trained rank 0's pruned model
    checkpoints = [sorted(p.name for p in folder.glob("checkpoint-*")) for folder in (run, run_dir(alone))]
    assert checkpoints[0] == checkpoints[1] != [], checkpoints  # the same steps, phase 2 saved at its end


@pytest.mark.parametrize("dying", [1, 0])
def test_multinode_node_death_in_phase1_ends_the_other_node(tiny, nodes, dying):
    out = tiny[0] / f"death_{dying}"
    procs, logs = nodes(f"death_{dying}", [out, out], "--deepspeed", "zero2", steps=400, capture=200)
    deadline = time.monotonic() + TIMEOUT_S
    while logs[0].read_text().count("'loss'") < 3:  # phase 1 is training on both nodes (rank 0 logs the loss)
        assert all(proc.poll() is None for proc in procs), logs[0].read_text()[-4000:]
        assert time.monotonic() < deadline
        time.sleep(1)
    kill_tree(procs[dying])
    survivor = procs[1 - dying]
    killed_at = time.monotonic()
    code = survivor.wait(timeout=180)
    text = logs[1 - dying].read_text()
    assert code != 0, text[-4000:]
    assert time.monotonic() - killed_at < 120
    assert "[GradPruner] error: phase 1 failed: RuntimeError:" in text, text[-4000:]
    assert not list(out.glob("v*/gradprune/model"))


def test_multinode_output_dir_not_shared_is_refused_before_phase1(tiny, nodes):
    outputs = [tiny[0] / "node0_only", tiny[0] / "node1_only"]
    procs, logs = nodes("not_shared", outputs, "--deepspeed", "zero2")
    codes = [proc.wait(timeout=TIMEOUT_S) for proc in procs]
    for node, (code, log) in enumerate(zip(codes, logs)):
        text = log.read_text()
        assert code != 0, text[-4000:]
        errors = [line for line in text.splitlines() if line.startswith("[GradPruner] error:")]
        assert len(errors) == 1, text[-4000:]
        assert f"--output_dir {outputs[node]}" in errors[0]
        assert "is not shared between the nodes: rank 1 (node 1, host" in errors[0]
        assert "every node mounts" in errors[0]
        assert "phase 1 done" not in text and "Train:" not in text
        assert not list(outputs[node].glob("v*/gradprune"))
