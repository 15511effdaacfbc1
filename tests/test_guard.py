"""The quality guard and prune_layers='auto', against KL and losses of really pruned copies of the model."""

import copy

import pytest
import torch

import reference
from conftest import random_lora_grads
from swift_gradpruner.config import GradPruneConfig, GradPruneConfigError
from swift_gradpruner.guard import GuardError, kl_with_plan, largest_within, loss_with_plan
from swift_gradpruner.importance import IGIAAccumulator
from swift_gradpruner.measures import mean_kl, mean_loss, reference_of
from swift_gradpruner.merge import merge_removed_layers
from swift_gradpruner.prune import prune_model
from swift_gradpruner.selection import plan_layers
from swift_gradpruner.surgery import remove_layers
from swift_gradpruner.swift.holdout import first_rows, hold_out
from swift_gradpruner.tiny import build_model

LAYERS = 6


def batches(seed, rows=4, width=10):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (rows, width), generator=gen)
    labels = ids.clone()
    labels[:, :3] = -100
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}]


@pytest.fixture(scope="module")
def trained():
    """A tiny Llama fitted to the guard rows, so that removing layers really hurts; and its IGIA gradients."""
    torch.manual_seed(0)
    model = build_model("llama", num_layers=LAYERS, vocab_size=64, seed=2)
    rows = batches(0)[0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        model(input_ids=rows["input_ids"], labels=rows["labels"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    accumulator = IGIAAccumulator()
    for grads in random_lora_grads(model, rank=4, steps=2, seed=1, scale=1.0):
        accumulator.update(grads)
    return model, accumulator


def pruned_copy(model, accumulator, plan, config):
    clone = copy.deepcopy(model)
    merge_removed_layers(clone, plan, lambda name: accumulator.igia(name), config)
    remove_layers(clone, plan.removed)
    return clone


def test_measures_with_a_plan_equal_a_pruned_copy_and_leave_the_model_alone(trained):
    model, accumulator = trained
    config = GradPruneConfig(prune_layers=3, merge_layers=2, benchmark=False)
    plan = plan_layers(accumulator_scores(accumulator), 3, 2)
    assert plan.merged  # the merge is part of what is measured
    before = {k: v.clone() for k, v in model.state_dict().items()}
    igia = lambda name: accumulator.igia(name)  # noqa: E731
    clone = pruned_copy(model, accumulator, plan, config)
    assert loss_with_plan(model, plan, igia, config, batches(0)) == pytest.approx(
        reference.answer_loss(clone, batches(0)), rel=1e-5
    )
    dense = reference_of(model, batches(0))
    assert kl_with_plan(model, plan, igia, config, batches(0), dense) == pytest.approx(
        reference.kl_to(model, clone, batches(0)), rel=1e-4
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.config.num_hidden_layers == LAYERS


def test_a_flatter_model_cannot_pass_for_a_better_one():
    """The answer loss of a model that is confidently wrong falls when its predictions are flattened;
    the KL from the dense model rises (the failure the old loss-based guard had on short answers)."""
    model = build_model("llama", num_layers=2, vocab_size=64, seed=4).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # confident; its random predictions are wrong on random labels
    rows = batches(1)
    dense = reference_of(model, rows)
    flat = copy.deepcopy(model)
    with torch.no_grad():
        flat.model.norm.weight.mul_(0.05)  # the same head, on smaller final hidden states
    assert mean_loss(flat, rows) < 0.5 * mean_loss(model, rows)  # "better" by the loss
    assert mean_kl(flat, rows, dense) > 1.0 > mean_kl(model, rows, dense)  # moved far by the KL
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.mul_(0.5)
    with pytest.raises(ValueError, match="dense model's LM head"):
        mean_kl(other, rows, dense)


def accumulator_scores(accumulator):
    from swift_gradpruner.importance import layer_scores

    return layer_scores(accumulator.linear_scores(), LAYERS)[0]


def test_largest_within_bisects_a_growing_loss():
    losses = {1: 1.0, 2: 1.1, 3: 1.3, 4: 2.0, 5: 5.0}
    asked = []

    def loss_of(n):
        asked.append(n)
        return losses[n]

    assert largest_within(1, 5, loss_of, 1.3) == 3
    assert len(asked) <= 4
    assert largest_within(1, 5, losses.get, 0.5) is None
    assert largest_within(1, 5, losses.get, 9.0) == 5
    assert largest_within(1, 0, losses.get, 9.0) is None


def brute_force_curve(model, accumulator, config, guard, counts):
    """KL from the dense model of really pruned copies, per count of removed layers."""
    scores = accumulator_scores(accumulator)
    plans = {n: plan_layers(scores, n, min(config.merge_layers, n)) for n in counts}
    return {n: reference.kl_to(model, pruned_copy(model, accumulator, p, config), guard) for n, p in plans.items()}


def test_guard_fires_on_a_damaging_prune_and_names_a_count_within_it(trained):
    model, accumulator = trained
    guard = batches(0)
    probe = GradPruneConfig(prune_layers=4, merge_layers=1, benchmark=False, score="squared")
    curve = brute_force_curve(model, accumulator, probe, guard, range(1, 5))
    limit = (curve[1] + curve[4]) / 2  # 1 layer is within it, 4 are not
    config = GradPruneConfig(prune_layers=4, merge_layers=1, benchmark=False, max_kl=limit, score="squared")
    result = prune_model(copy.deepcopy(model), accumulator, config, guard=guard)
    report = result.report["quality_guard"]
    assert report["kl"] == pytest.approx(curve[4], rel=1e-4)
    assert report["dense_loss"] == pytest.approx(reference.answer_loss(model, guard), rel=1e-5)
    assert report["ok"] is False and not result.guard.ok and report["tokens"] == 40
    # The suggestion is the bisection's answer on the real curve, and it is within the threshold.
    assert report["suggestion"] == largest_within(1, 3, curve.get, limit)
    assert curve[report["suggestion"]] <= limit
    assert "threshold" in result.guard.message(4) and f"--gradprune_prune_layers {report['suggestion']}" in (
        result.guard.message(4)
    )
    quiet = GradPruneConfig(prune_layers=4, merge_layers=1, benchmark=False, max_kl=100.0, score="squared")
    result = prune_model(copy.deepcopy(model), accumulator, quiet, guard=guard)
    assert result.report["quality_guard"]["ok"] is True and result.report["quality_guard"]["suggestion"] is None


def test_auto_keeps_the_largest_count_within_the_threshold(trained):
    model, accumulator = trained
    guard = batches(0)
    curve = brute_force_curve(model, accumulator, GradPruneConfig(merge_layers=1), guard, range(1, 5))
    values = sorted(curve.values())
    limit = (values[1] + values[2]) / 2  # a threshold between the curve's points
    config = GradPruneConfig(prune_layers="auto", prune_ratio=0.6, merge_layers=1, benchmark=False,
                             max_kl=limit, score="squared")  # fmt: skip
    pruned = copy.deepcopy(model)
    result = prune_model(pruned, accumulator, config, guard=guard)
    chosen = len(result.plan.removed)
    assert chosen == largest_within(1, 4, curve.get, config.max_kl)  # 0.6 of 6 equal layers: at most 4
    assert curve[chosen] <= config.max_kl
    assert pruned.config.num_hidden_layers == LAYERS - chosen
    assert result.report["quality_guard"]["ok"] is True

    with pytest.raises(GuardError, match="even one layer"):
        prune_model(copy.deepcopy(model), accumulator, GradPruneConfig(
            prune_layers="auto", merge_layers=0, benchmark=False, max_kl=0.0, score="squared"),
            guard=batches(0))  # fmt: skip
    with pytest.raises(ValueError, match="held-out guard"):
        config = GradPruneConfig(prune_layers="auto", benchmark=False, score="squared")
        prune_model(copy.deepcopy(model), accumulator, config)


def test_auto_and_guard_options_are_checked():
    with pytest.raises(GradPruneConfigError, match="prune_layers='most'.*or auto"):
        GradPruneConfig(prune_layers="most")
    with pytest.raises(GradPruneConfigError, match="guard_rows"):
        GradPruneConfig(prune_layers="auto", guard_rows=0)
    with pytest.raises(GradPruneConfigError, match="max_kl"):
        GradPruneConfig(max_kl=-0.1)
    assert GradPruneConfig(prune_layers="auto", prune_ratio=0.3).prune_ratio == 0.3


def test_hold_out_rows_are_fixed_disjoint_and_skipped_when_too_few():
    from datasets import Dataset

    data = Dataset.from_dict({"i": list(range(200))})
    rest, held = hold_out(data, 32, seed=7)
    assert len(held) == 32 and len(rest) == 168
    assert not set(held["i"]) & set(rest["i"]) and set(held["i"]) | set(rest["i"]) == set(range(200))
    assert hold_out(data, 32, seed=7)[1]["i"] == held["i"]
    assert hold_out(data.select(range(100)), 32, seed=7)[1] is None  # fewer than 4 x 32 rows: no guard
    assert hold_out(data, 0, seed=7)[1] is None
    assert [r["i"] for r in first_rows(rest, 5, seed=1)] == [r["i"] for r in first_rows(rest, 5, seed=1)]
