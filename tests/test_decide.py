"""Issue 18 item 10: rank 0 decides what a run does before phase 2, for every rank (two real gloo ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from swift_gradpruner.tiny import build_model
from swift_run import free_port

RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from dataclasses import asdict
    from pathlib import Path
    from types import SimpleNamespace

    import torch.distributed as dist

    from swift_gradpruner.config import GradPruneConfig, GradPruneConfigError
    from swift_gradpruner.swift import decide, keys, reuse
    from swift_gradpruner.swift.preflight import ModelFacts

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out, model, data = sys.argv[1:4]
    if rank == 1:
        def no_data(args):
            raise AssertionError("rank 1 read the dataset files")
        keys.dataset_digests = no_data
        # A rank with another view of the file system: it would have pruned from a state rank 0 does not see.
        reuse.find_state = lambda *a: Path(out) / "gradprune" / "state"

    def arguments(batch, output_dir=out):
        return SimpleNamespace(model=model, model_dir=model, model_revision=None, model_type="llama",
                             dataset=[data], val_dataset=[], output_dir=output_dir,
                             add_version=False, resume_from_checkpoint=None, max_steps=6, init_weights=True,
                             per_device_train_batch_size=batch, streaming=False, num_train_epochs=1,
                             training_args=SimpleNamespace(gradient_accumulation_steps=1))

    config = GradPruneConfig(prune_layers=2, score="squared")
    facts = ModelFacts(layers=6, remove=2, kept_compute=0.7)
    broken = str(Path(out).with_name("broken"))  # holds a truncated phase1.json (the test wrote it)
    for scenario, batch, where in (("same", 2, out), ("differ", 4 if rank == 1 else 2, out), ("broken", 2, broken)):
        try:
            result = {"decision": asdict(decide.decide(arguments(batch, where), config, facts))}
        except GradPruneConfigError as error:
            result = {"error": str(error)}
        print(json.dumps({"rank": rank, "scenario": scenario, **result}), flush=True)
    dist.destroy_process_group()
    """
)


def test_rank_0_decides_and_a_rank_with_other_settings_stops_every_rank(tmp_path):
    model = tmp_path / "model"
    build_model("llama", num_layers=6, vocab_size=64).save_pretrained(model)
    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    state = tmp_path / "broken" / "gradprune" / "state"
    state.mkdir(parents=True)
    (state / "phase1.json").write_text('{"phase1_key": "0123')  # an interrupted write: rank 0 fails to read it
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "out"), str(model), str(data)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in range(2)
    ]
    results = {}
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        for line in stdout.splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                results[row["rank"], row["scenario"]] = row
    same = results[0, "same"]["decision"]
    assert same == results[1, "same"]["decision"]  # rank 1 followed rank 0, not its own view
    assert same["action"] == "phase1" and same["state_dir"] == str(tmp_path / "out" / "gradprune" / "state")
    for rank in (0, 1):
        error = results[rank, "differ"]["error"]
        assert "rank 1 has swift per_device_train_batch_size = '4' where rank 0 has '2'" in error, error
        assert "\n" not in error
    # Issue 24 item 3: any failure of rank 0's decision (not only bad input) stops every rank with one line.
    broken = [results[rank, "broken"]["error"] for rank in (0, 1)]
    assert broken[0] == broken[1], broken
    assert broken[0].startswith("deciding what this run does failed: JSONDecodeError: "), broken[0]
