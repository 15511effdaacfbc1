"""Issue 18 item 1: the keys that decide reuse follow the base model's weights, not only its path."""

import os
from types import SimpleNamespace

from swift_gradpruner.config import GradPruneConfig
from swift_gradpruner.swift import keys
from swift_gradpruner.tiny import build_model


def arguments(model) -> SimpleNamespace:
    args = SimpleNamespace(**dict.fromkeys(keys.HASHED_ARGS))
    args.__dict__.update(model=str(model), model_dir=str(model), dataset=[], val_dataset=[],
                         training_args=SimpleNamespace(gradient_accumulation_steps=1))  # fmt: skip
    return args


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
