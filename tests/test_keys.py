"""Issue 33: one key per decision (swift/keys.py's table), each changed by what that decision depends on
and by nothing else. One test per row of the table."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from swift_gradpruner.config import GradPruneConfig, GradPruneConfigError
from swift_gradpruner.swift import keys, reuse
from swift_gradpruner.tiny import build_model


def test_model_identity_follows_the_loaded_weights_not_paths_times_or_other_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_model("llama", num_layers=2, vocab_size=64, seed=0).save_pretrained(a)
    shutil.copytree(a, b)
    os.utime(b / "model.safetensors", ns=(0, 10**9))  # the same files, copied at another time (another node)
    first = keys.model_identity(a)
    assert set(first) == {"config.json", "model.safetensors"} and keys.model_identity(b) == first
    for extra in ("optimizer.pt", "pytorch_model.bin", "consolidated.safetensors", "README.md"):
        (b / extra).write_bytes(b"not loaded")  # files from_pretrained does not read with model.safetensors there
    assert keys.model_identity(b) == first

    # A same-size file with other weights (another seed: every tensor differs) in place of the first.
    other = tmp_path / "other"
    build_model("llama", num_layers=2, vocab_size=64, seed=1).save_pretrained(other)
    assert (other / "model.safetensors").stat().st_size == (a / "model.safetensors").stat().st_size
    shutil.copyfile(other / "model.safetensors", b / "model.safetensors")
    changed = keys.model_identity(b)
    assert changed != first and changed["config.json"] == first["config.json"]
    assert changed["model.safetensors"][0] == first["model.safetensors"][0]  # same size, other content


def test_the_sampled_hash_reads_blocks_across_a_large_file(tmp_path, monkeypatch):
    monkeypatch.setattr(keys, "SAMPLE_BYTES", 8)
    path = tmp_path / "w.bin"
    data = bytearray(range(256)) * 4  # 1024 bytes > 16 blocks of 8
    path.write_bytes(bytes(data))
    first = keys.sampled_hash(path)
    data[-1] ^= 1  # the last block is always sampled
    path.write_bytes(bytes(data))
    assert keys.sampled_hash(path) != first


def test_a_hugging_face_snapshot_is_identified_by_its_commit(tmp_path):
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "models--org--name" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    assert keys.model_identity(snapshot) == {"hub_revision": revision}  # with or without the weights yet


def _batches(seed: int = 0) -> dict[str, list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2, 5), generator=gen)
    return {"guard": [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}],
            "calibration": []}  # fmt: skip


def test_the_rows_key_is_the_hash_of_the_encoded_rows_as_saved(tmp_path):
    from swift_gradpruner.swift.holdout import load_batches, save_batches

    batches = _batches()
    save_batches(tmp_path / "b.safetensors", batches)
    first = keys.rows_key(batches)
    assert keys.rows_key(load_batches(tmp_path / "b.safetensors")) == first  # what a saved state gives back
    changed = _batches()
    changed["guard"][0]["input_ids"][1, 4] += 1  # one token of one row
    assert keys.rows_key(changed) != first
    moved = {"guard": [], "calibration": batches["guard"]}  # the same rows as calibration, not guard rows
    assert keys.rows_key(moved) != first


@pytest.fixture(scope="module")
def parsed(tmp_path_factory):
    """Real swift arguments, parsed as ``swift sft`` parses them, for a tiny model and data file."""
    from swift_gradpruner.swift.preflight import parse_sft_args
    from swift_gradpruner.tiny import create_tiny

    root = tmp_path_factory.mktemp("keys")
    model, data = create_tiny(root, "llama", num_layers=2, rows=8)

    def parse(*extra: str, dataset: str = str(data)):
        return parse_sft_args(["--model", str(model), "--model_type", "llama", "--template", "chatml", "--dataset",
                               dataset, "--check_model", "false", "--tuner_type", "lora", "--max_steps", "4",
                               "--output_dir", str(root / "out"), *extra])  # fmt: skip

    return SimpleNamespace(parse=parse, root=root, data=data)


def _phase1_key(args, config=None) -> str:
    config = config or GradPruneConfig(score="squared")
    return keys.phase1_key(args, config, keys.model_identity(args.model_dir), keys.dataset_digests(args))


def test_the_phase1_key_follows_training_settings_and_data_not_where_they_are(parsed, monkeypatch):
    first = _phase1_key(parsed.parse())
    assert _phase1_key(parsed.parse("--logging_steps", "3", "--save_steps", "7", "--report_to", "none")) == first
    for changed in (("--learning_rate", "3e-4"), ("--max_steps", "6"), ("--response_prefix", "Sure:"),
                    ("--lora_bias", "all")):  # fmt: skip
        assert _phase1_key(parsed.parse(*changed)) != first, changed
    assert _phase1_key(parsed.parse(), GradPruneConfig(score="squared", steps=3)) != first
    monkeypatch.chdir(parsed.data.parent)  # the same file typed as a relative path
    assert _phase1_key(parsed.parse(dataset=parsed.data.name)) == first
    assert _phase1_key(parsed.parse(dataset=f"{parsed.data.name}#4")) != first  # fewer rows
    secret = "hf_do_not_store_me"
    args = parsed.parse("--hub_token", secret)
    assert secret not in str(keys.phase1_material(args, GradPruneConfig(), {}, keys.dataset_digests(args)))


def test_a_dataset_folder_is_keyed_by_content_and_swifts_rename_of_its_infos_changes_nothing(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"messages": []}\n')
    (folder / keys.DATASET_INFOS).write_text("{}")
    args = SimpleNamespace(dataset=[str(folder)], val_dataset=[])
    first = keys.dataset_digests(args)
    (folder / keys.DATASET_INFOS).rename(folder / f"{keys.DATASET_INFOS}_bak")  # swift's first load does this
    assert keys.dataset_digests(args) == first
    (folder / "train.jsonl").write_text('{"messages": [1]}\n')
    assert keys.dataset_digests(args) != first


def test_every_swift_argument_is_in_the_phase1_key_unless_named_as_not_shaping_it():
    """Issue 24 item 4: the whole argument dataclass is hashed, so an argument a new ms-swift adds counts."""
    from dataclasses import fields

    from swift.arguments import SftArguments

    names = {f.name for f in fields(SftArguments)}
    assert names >= keys.NOT_HASHED, sorted(keys.NOT_HASHED - names)  # no stale names in the list
    row_shaping = {"enable_thinking", "response_prefix", "agent_template", "columns", "max_length",
                   "truncation_strategy", "learning_rate", "lora_rank", "seed", "data_seed"}  # fmt: skip
    assert not row_shaping & keys.NOT_HASHED
    assert {"hub_token", "swanlab_token", "local_rank", "output_dir", "dataset"} <= keys.NOT_HASHED


def test_a_patch_release_changes_no_phase1_key_a_minor_release_does(parsed, monkeypatch):
    args, config = parsed.parse(), GradPruneConfig(score="squared")
    now = {"torch": "2.13.0", "transformers": "5.19.0", "peft": "0.20.0", "ms-swift": "4.6.0", "deepspeed": None,
           keys.OWN: "0.1.0"}  # fmt: skip

    def key(**versions) -> str:
        monkeypatch.setattr(keys, "versions", lambda: {**now, **versions})
        return keys.phase1_key(args, config, {}, [])

    first = key()
    assert key(transformers="5.19.1", torch="2.13.1+cpu") == first
    assert key(transformers="5.20.0") != first and key(**{keys.OWN: "0.1.1"}) != first


def test_the_prune_key_holds_the_model_rows_and_pruning_options_nothing_of_phase_2():
    identity, rows = {"config.json": "abc", "model.safetensors": [10, "ff"]}, "r0"
    default = GradPruneConfig()
    first = keys.prune_key(identity, rows, None, default, "llama")
    # No swift argument is an input: a new learning rate, epoch count or DeepSpeed config cannot change it.
    # Phase-1 options do nothing without phase 1, and what is only measured or kept does not count.
    for same in (GradPruneConfig(steps=5, lora_rank=4), GradPruneConfig(benchmark=False, keep_state=True)):
        assert keys.prune_key(identity, rows, None, same, "llama") == first
    assert keys.prune_key({**identity, "model.safetensors": [10, "fe"]}, rows, None, default, "llama") != first
    assert keys.prune_key(identity, "r1", None, default, "llama") != first
    assert keys.prune_key(identity, rows, None, GradPruneConfig(prune_ratio=0.25), "llama") != first
    assert keys.prune_key(identity, rows, None, default, "qwen2") != first
    paper = GradPruneConfig(score="squared")
    with_phase1 = keys.prune_key(identity, rows, "p0", paper, "llama")
    assert keys.prune_key(identity, rows, "p1", paper, "llama") != with_phase1  # other gradients
    assert keys.prune_key(identity, rows, "p0", GradPruneConfig(score="squared", steps=5), "llama") != with_phase1


def test_ranks_compare_a_local_model_by_identity_and_a_hub_model_by_id_and_revision(parsed, tmp_path):
    args, config = parsed.parse(), GradPruneConfig()
    local = keys.agreement(args, config)
    assert local["model"] == keys.model_identity(args.model_dir) and local["gradprune"] == config.to_dict()
    hub = SimpleNamespace(**{**vars(args), "model": "org/name", "model_dir": str(tmp_path / "partial")})
    (tmp_path / "partial").mkdir()  # another node's cache folder, its weights not downloaded yet
    seen = keys.agreement(hub, config)
    assert seen["model"] == {} and seen["swift"]["model"] == "org/name"
    assert keys.differences(seen, {**seen, "swift": {**seen["swift"], "model_revision": "v2"}}) == [
        ("swift model_revision", "None", "v2")
    ]


def _pruned(tmp_path: Path, config: GradPruneConfig, base: dict, versions: dict) -> tuple[Path, Path]:
    """A pruned model folder with its report as a run records it, and a phase-2 checkpoint trained on it."""
    pruned, checkpoint = tmp_path / "pruned", tmp_path / "checkpoint-4"
    build_model("llama", num_layers=2, vocab_size=64).save_pretrained(pruned)
    checkpoint.mkdir()
    report = {"config": config.to_dict(), "config_hash": "k0", "model_identity": base, "versions": versions,
              "pruned_identity": keys.model_identity(pruned)}  # fmt: skip
    (pruned / "gradprune_report.json").write_text(json.dumps(report))
    (checkpoint / "args.json").write_text(json.dumps({"model": str(pruned), "max_steps": 4, "learning_rate": 1e-4}))
    return pruned, checkpoint


def test_resume_checks_the_pruned_model_and_what_made_it_and_nothing_of_phase_2(tmp_path, monkeypatch):
    config = GradPruneConfig()
    base = {"config.json": "abc", "model.safetensors": [10, "ff"]}
    now = keys.versions()
    pruned, checkpoint = _pruned(tmp_path, config, base, {**now, "transformers": "5.18.2"})
    lines: list[str] = []
    # Phase-2 settings are not inputs at all; only package versions differ: one line, and the run goes on.
    assert reuse.pruned_model_of_checkpoint(str(checkpoint), base, config, lines.append) == (pruned, "k0")
    assert len(lines) == 1 and f"versions transformers '5.18.2' then, {now['transformers']!r} now" in lines[0]
    assert reuse.pruned_model_of_checkpoint(str(checkpoint), base, GradPruneConfig(steps=9), print)[0] == pruned

    swapped = {**base, "model.safetensors": [10, "fe"]}  # the base weights replaced by a same-size file
    with pytest.raises(GradPruneConfigError, match=r"model model\.safetensors \[10, 'ff'\] then, \[10, 'fe'\] now"):
        reuse.pruned_model_of_checkpoint(str(checkpoint), swapped, config, print)
    with pytest.raises(GradPruneConfigError, match="gradprune topp 0.2 then, 0.5 now"):
        reuse.pruned_model_of_checkpoint(str(checkpoint), base, GradPruneConfig(topp=0.5), print)
    weights = pruned / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the pruned model itself damaged on disk
    weights.write_bytes(bytes(data))
    with pytest.raises(GradPruneConfigError, match="pruned model model.safetensors"):
        reuse.pruned_model_of_checkpoint(str(checkpoint), base, config, print)
    (pruned / "gradprune_report.json").unlink()
    with pytest.raises(GradPruneConfigError, match="which is not a GradPruner model"):
        reuse.pruned_model_of_checkpoint(str(checkpoint), base, config, print)
