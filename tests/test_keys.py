"""Issue 18 item 1: the keys that decide reuse follow the base model's weights, not only its path."""

import os
from types import SimpleNamespace

from swift_gradpruner.config import GradPruneConfig
from swift_gradpruner.swift import keys
from swift_gradpruner.tiny import build_model


def arguments(model) -> SimpleNamespace:
    return SimpleNamespace(model=str(model), model_dir=str(model), dataset=[], val_dataset=[],
                           training_args=SimpleNamespace(gradient_accumulation_steps=1))  # fmt: skip


def test_the_phase1_key_changes_when_the_weights_at_the_same_path_change(tmp_path):
    model = tmp_path / "model"
    build_model("llama", num_layers=4, vocab_size=64, seed=0).save_pretrained(model)
    config = GradPruneConfig()
    first = keys.phase1_key(keys.key_material(arguments(model), config, data=True))
    assert keys.phase1_key(keys.key_material(arguments(model), config, data=True)) == first  # stable

    build_model("llama", num_layers=4, vocab_size=64, seed=1).save_pretrained(model)  # a re-exported model
    second = keys.phase1_key(keys.key_material(arguments(model), config, data=True))
    assert second != first

    weights = model / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same size, rewritten later
    assert keys.phase1_key(keys.key_material(arguments(model), config, data=True)) != second


def test_a_hub_snapshot_is_identified_by_its_revision_and_nodes_may_hold_own_copies(tmp_path):
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "models--org--name" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    assert keys.model_fingerprint(snapshot) == {"hub_revision": revision}
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        build_model("llama", num_layers=2, vocab_size=64).save_pretrained(folder)
    os.utime(b / "model.safetensors", ns=(0, 10**9))
    fa, fb = keys.model_fingerprint(a), keys.model_fingerprint(b)
    assert fa != fb and keys.portable(fa) == keys.portable(fb)  # the same files copied at another time
    mine, theirs = {"model": fa}, {"model": fb}
    assert keys.differences(mine, theirs) == []


ROW_SHAPING = ("enable_thinking", "response_prefix", "agent_template", "columns", "interleave_prob",
               "stopping_strategy", "target_parameters", "lora_bias", "neftune_noise_alpha", "max_pixels",
               "freeze_vit")  # fmt: skip


def test_every_swift_argument_is_hashed_unless_named_as_phase2_only():
    """Issue 24 item 4: the whole argument dataclass is hashed, so an argument a new ms-swift adds counts."""
    from dataclasses import fields

    from swift.arguments import SftArguments

    names = {f.name for f in fields(SftArguments)}
    assert names >= keys.NOT_HASHED, sorted(keys.NOT_HASHED - names)  # no stale names in the list
    assert not set(ROW_SHAPING) & keys.NOT_HASHED
    assert {"hub_token", "swanlab_token", "local_rank", "output_dir"} <= keys.NOT_HASHED  # secrets, per-rank, paths


def test_row_shaping_options_change_the_key_and_where_the_run_logs_does_not(tmp_path):
    """Real swift arguments, parsed as ``swift sft`` parses them."""
    from swift_gradpruner.swift.preflight import parse_sft_args
    from swift_gradpruner.tiny import create_tiny

    model, data = create_tiny(tmp_path, "llama", num_layers=2, rows=8)
    base = ["--model", str(model), "--model_type", "llama", "--template", "chatml", "--dataset", str(data),
            "--check_model", "false", "--tuner_type", "lora", "--max_steps", "4"]  # fmt: skip
    config = GradPruneConfig()

    def key(*extra: str) -> str:
        args = parse_sft_args([*base, "--output_dir", str(tmp_path / "out"), *extra])
        return keys.phase1_key(keys.key_material(args, config, data=True))

    first = key()
    assert key("--logging_steps", "3", "--save_steps", "7", "--report_to", "none", "--eval_steps", "9") == first
    assert key("--response_prefix", "Sure:") != first
    assert key("--enable_thinking", "false") != first
    assert key("--lora_bias", "all") != first
    secret = "hf_do_not_store_me"
    args = parse_sft_args([*base, "--output_dir", str(tmp_path / "out"), "--hub_token", secret])
    assert secret not in str(keys.key_material(args, config, data=True))


def test_a_patch_release_changes_no_key_a_minor_release_does():
    material = {"gradprune": {}, "swift": {}, "model": {}, "data": {},
                "versions": {"transformers": "5.19.0", "torch": "2.13.0", keys.OWN: "0.1.0"}}  # fmt: skip
    first = keys.phase1_key(material)
    patched = {**material, "versions": {**material["versions"], "transformers": "5.19.1", "torch": "2.13.1+cpu"}}
    assert keys.phase1_key(patched) == first
    assert keys.phase1_key({**material, "versions": {**material["versions"], "transformers": "5.20.0"}}) != first
    assert keys.phase1_key({**material, "versions": {**material["versions"], keys.OWN: "0.1.1"}}) != first


def _checkpoint_of(tmp_path, report: dict):
    import json

    pruned, checkpoint = tmp_path / "pruned", tmp_path / "checkpoint-4"
    for folder in (pruned, checkpoint):
        folder.mkdir()
    (pruned / "gradprune_report.json").write_text(json.dumps(report))
    (checkpoint / "args.json").write_text(json.dumps({"model": str(pruned)}))
    return pruned, checkpoint


def test_resume_goes_on_when_only_package_versions_differ_and_names_any_other_difference(tmp_path):
    import pytest

    from swift_gradpruner.config import GradPruneConfigError
    from swift_gradpruner.swift import reuse

    config = GradPruneConfig()
    material = {"gradprune": {n: getattr(config, n) for n in keys.PHASE1_OPTIONS}, "swift": {"lora_rank": "8"},
                "model": {"config.json": "abc"}, "versions": {"transformers": "5.19.0"}, "data": {"d.jsonl": "1"}}
    made = {"config": config.to_dict(), "swift_settings": {"lora_rank": "8"},
            "model_fingerprint": {"config.json": "abc"}, "versions": {"transformers": "5.18.2"},
            "data_digests": {"d.jsonl": "1"}, "config_hash": "old"}  # fmt: skip
    pruned, checkpoint = _checkpoint_of(tmp_path, made)
    lines = []
    assert reuse.pruned_model_of_checkpoint(str(checkpoint), "new", material, config, lines.append) == pruned
    assert len(lines) == 1 and "versions transformers '5.18.2' then, '5.19.0' now" in lines[0], lines
    changed = {**material, "swift": {"lora_rank": "16"}}
    with pytest.raises(GradPruneConfigError, match="swift lora_rank '8' then, '16' now"):
        reuse.pruned_model_of_checkpoint(str(checkpoint), "new", changed, config, lines.append)
    with pytest.raises(GradPruneConfigError, match="gradprune topp 0.2 then, 0.5 now"):
        reuse.pruned_model_of_checkpoint(str(checkpoint), "new", material, GradPruneConfig(topp=0.5), lines.append)
