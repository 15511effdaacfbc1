"""Seam healing (healing.py) against brute force: the seams of a removal, the dense hidden states around
each seam, the seam loss of the pruned model's layer, and what training changes."""

import copy
import itertools

import pytest
import torch
from torch import nn

from swift_gradpruner import healing
from swift_gradpruner.architecture import decoder_layers
from swift_gradpruner.surgery import remove_layers
from swift_gradpruner.tiny import build_model

NUM_LAYERS = 6


def batches(seed=0, rows=4, width=12):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (rows, width), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    mask[3, 6:] = 0
    return [{"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}]


@pytest.mark.parametrize("num_layers", [1, 2, 5, 7])
def test_seams_cover_every_removed_run_with_one_kept_layer_each(num_layers):
    for count in range(num_layers):
        for removed in itertools.combinations(range(num_layers), count):
            seams = healing.seams_of(num_layers, removed)
            blocks = [set(range(s.first, s.last + 1)) for s in seams]
            # every block: one kept layer (the trained one) plus one whole run of removed layers
            for seam, block in zip(seams, blocks):
                assert seam.layer not in removed and block - {seam.layer} <= set(removed)
                run = sorted(block - {seam.layer})
                assert run == list(range(run[0], run[-1] + 1))
                assert run[0] - 1 not in removed and run[-1] + 1 not in removed  # a whole run
                assert seam.layer == (run[0] - 1 if run[0] > 0 else run[-1] + 1)
            assert sorted(j for b in blocks for j in b if j in removed) == sorted(removed)  # each once


def hidden_states(model, batch):
    """Input of each decoder layer and the last layer's output, by brute force (HF output_hidden_states,
    with the final norm's input taken from a hook)."""
    out = {}
    handle = model.model.norm.register_forward_pre_hook(lambda m, a: out.setdefault("last", a[0].detach()))
    try:
        with torch.no_grad():
            states = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           output_hidden_states=True, use_cache=False).hidden_states  # fmt: skip
    finally:
        handle.remove()
    n = len(decoder_layers(model))
    return [*states[:n], out["last"]]  # position j: entering layer j; position n: leaving the last layer


@pytest.mark.parametrize("removed", [[2, 3], [0, 1], [5], [1, 4]])
def test_dense_rows_and_the_pruned_layers_seam_loss_match_full_forward_passes(removed):
    dense = build_model("llama", num_layers=NUM_LAYERS, vocab_size=128, seed=3).eval()
    data = batches()
    seams = healing.seams_of(NUM_LAYERS, removed)
    rows = healing.dense_rows(dense, data, seams)
    states = hidden_states(dense, data[0])
    real = data[0]["attention_mask"].bool()
    for seam, (row,) in zip(seams, rows):
        torch.testing.assert_close(row.entering, states[seam.first], rtol=0, atol=0)
        torch.testing.assert_close(row.leaving, states[seam.last + 1], rtol=0, atol=0)
        assert torch.equal(row.real, real)
        # Brute force: the dense model without this seam's run computes layer_k(entering) as its hidden
        # state leaving k (every layer before the block is unchanged).
        alone = copy.deepcopy(dense)
        run = [j for j in range(seam.first, seam.last + 1) if j != seam.layer]
        remove_layers(alone, run)
        kept_alone = [j for j in range(NUM_LAYERS) if j not in run]
        stitched = hidden_states(alone, data[0])[kept_alone.index(seam.layer) + 1]
        layer = decoder_layers(alone)[kept_alone.index(seam.layer)]
        torch.testing.assert_close(healing.layer_output(layer, row), stitched, rtol=1e-5, atol=1e-5)
        cos = nn.functional.cosine_similarity(stitched[real], states[seam.last + 1][real], dim=-1)
        expected = float((1 - cos).mean())
        assert float(healing.seam_loss(stitched, row.leaving, real)) == pytest.approx(expected, rel=1e-6)
        rel = (stitched - row.leaving).pow(2).sum(-1) / row.leaving.pow(2).sum(-1)
        assert float(healing.seam_loss(stitched, row.leaving, real, "mse")) == pytest.approx(
            float(rel[real].mean()), rel=1e-6
        )


@pytest.mark.parametrize("scope", ["layer", "mlp_out"])
def test_healing_lowers_each_seams_loss_and_changes_only_the_trained_weights(scope):
    dense = build_model("llama", num_layers=NUM_LAYERS, vocab_size=128, seed=3).eval()
    removed = [2, 3, 5]
    seams = healing.seams_of(NUM_LAYERS, removed)
    data = batches() + batches(seed=1)
    rows = healing.dense_rows(dense, data, seams)
    pruned = copy.deepcopy(dense)
    remove_layers(pruned, removed)
    kept = [j for j in range(NUM_LAYERS) if j not in removed]
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    report = healing.heal_seams(pruned, kept, seams, rows, steps=30, lr=1e-3, scope=scope)
    assert [r["layer"] for r in report] == [1, 4]
    for r in report:
        assert r["loss_after"] < 0.9 * r["loss_before"]
    trained = {f"model.layers.{kept.index(s.layer)}." for s in seams}
    for key, value in pruned.state_dict().items():
        changed = not torch.equal(value, before[key])
        expected = any(key.startswith(p) for p in trained) and (scope == "layer" or "down_proj" in key)
        if scope == "layer" and expected and "norm" in key:
            continue  # norms may or may not move in 30 steps; the projections must
        assert changed == expected, key
    assert all(p.requires_grad for p in pruned.parameters())  # flags restored


def test_bad_settings_name_the_value():
    with pytest.raises(ValueError, match="'huber'"):
        healing.seam_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.ones(1, 2, dtype=torch.bool), "huber")
    with pytest.raises(ValueError, match="'attn'"):
        healing.trainable(nn.Linear(2, 2), "attn")


@pytest.mark.parametrize("removed", [[2, 3], [0, 1], [5], [1, 4], [0, 5]])
def test_full_modules_name_the_kept_layers_at_the_cuts_in_the_pruned_model(removed):
    model = build_model("llama", num_layers=NUM_LAYERS, vocab_size=128, seed=3)
    original = list(decoder_layers(model))
    remove_layers(model, removed)
    seams = healing.full_modules(model, removed, NUM_LAYERS, "seams")
    # brute force: each name resolves to the very layer object that stood next to a removed run
    assert [model.get_submodule(n) for n in seams] == [original[s.layer] for s in healing.seams_of(NUM_LAYERS, removed)]
    last = healing.full_modules(model, removed, NUM_LAYERS, "last")
    kept = [layer for j, layer in enumerate(original) if j not in removed]
    assert [model.get_submodule(n) for n in last] == [*kept[-2:], model.model.norm]
    with pytest.raises(ValueError, match="full='norm'"):
        healing.full_modules(model, removed, NUM_LAYERS, "norm")
