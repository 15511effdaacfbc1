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
            assert len({s.layer for s in seams}) == len(seams)  # no layer trained for two seams
            # every block: one kept layer (the trained one) plus the whole run of removed layers after it,
            # or the run before it when that run starts at 0, or both
            for seam, block in zip(seams, blocks):
                assert seam.layer not in removed and block - {seam.layer} <= set(removed)
                before = sorted(j for j in block if j < seam.layer)
                after = sorted(j for j in block if j > seam.layer)
                assert before == ([] if not before else list(range(0, seam.layer)))  # a whole run from layer 0
                assert after == list(range(seam.layer + 1, seam.layer + 1 + len(after)))
                assert seam.last + 1 not in removed and (before or after)  # a whole run
                assert bool(before) == (0 < seam.layer == len(set(range(seam.layer)) & set(removed)))  # the run at 0
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


@pytest.mark.parametrize("removed", [[2, 3], [0, 1], [5], [1, 4], [0, 2], [0, 1, 3, 4]])
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


def test_a_layer_between_two_runs_is_one_seam_and_its_reported_loss_holds():
    """Issue 33 item 3: of 6 layers, removing 0, 2 and 4 once gave layer 1 two seams ([0, 1] and [1, 2]):
    trained for the second, it no longer did what the first seam's reported loss said. In the pruned model
    layer 1 takes the embeddings and feeds layer 3: one seam, [0, 2]. Every reported loss_after is the
    healed model's own, by brute force: the pruned model's full forward pass for the first seam (its input
    is the dense one), the final layer on the dense inputs (what the loss is defined on) for every seam."""
    assert healing.seams_of(10, [0, 2]) == [healing.Seam(1, 0, 2)]
    dense = build_model("llama", num_layers=NUM_LAYERS, vocab_size=128, seed=3).eval()
    removed = [0, 2, 4]
    seams = healing.seams_of(NUM_LAYERS, removed)
    assert seams == [healing.Seam(1, 0, 2), healing.Seam(3, 3, 4)]
    data = batches() + batches(seed=1)
    rows = healing.dense_rows(dense, data, seams)
    pruned = copy.deepcopy(dense)
    remove_layers(pruned, removed)
    kept = [j for j in range(NUM_LAYERS) if j not in removed]
    report = healing.heal_seams(pruned, kept, seams, rows, steps=30, lr=1e-3)
    assert [(r["layer"], r["block"]) for r in report] == [(1, [0, 2]), (3, [3, 4])]
    assert all(r["loss_after"] < 0.9 * r["loss_before"] for r in report)
    layers = decoder_layers(pruned)
    for seam, batch_rows, r in zip(seams, rows, report):
        layer = layers[kept.index(seam.layer)]
        with torch.no_grad():
            losses = [float(healing.seam_loss(healing.layer_output(layer, row), row.leaving, row.real))
                      for row in batch_rows]  # fmt: skip
        assert r["loss_after"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    full = []
    for batch in data:
        real = batch["attention_mask"].bool()
        leaving = hidden_states(pruned, batch)[1]  # out of the pruned model's first layer, dense layer 1
        target = hidden_states(dense, batch)[3]  # out of dense layer 2
        full.append(float((1 - nn.functional.cosine_similarity(leaving[real], target[real], dim=-1)).mean()))
    assert report[0]["loss_after"] == pytest.approx(sum(full) / len(full), rel=1e-5)


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
