"""The removal criteria against brute-force references, and the product path with each of them."""

import pytest
import torch

import reference
from conftest import random_lora_grads
from swift_gradpruner import criteria, measures
from swift_gradpruner.config import REMOVAL_CRITERIA, GradPruneConfig
from swift_gradpruner.importance import IGIAAccumulator
from swift_gradpruner.prune import prune_model
from swift_gradpruner.surgery import layers_view
from swift_gradpruner.tiny import build_model

NUM_LAYERS = 6


def model_factory(arch="llama"):
    return lambda: build_model(arch, num_layers=NUM_LAYERS, vocab_size=128, seed=3).eval()


def calibration(seed=0, rows=4, width=12):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (rows, width), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding on one row
    mask[3, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # the "prompt" is not scored
    return [{"input_ids": ids, "attention_mask": mask, "labels": labels}]


def test_mean_loss_equals_full_logits():
    model = model_factory()()
    batches = calibration()
    assert measures.mean_loss(model, batches) == pytest.approx(reference.answer_loss(model, batches), rel=1e-5)


def test_layers_view_equals_removal_and_restores():
    model = model_factory()()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with layers_view(model, [0, 2, 5]):
        viewed = measures.mean_loss(model, calibration())
        assert model.config.num_hidden_layers == 3
    assert model.config.num_hidden_layers == NUM_LAYERS and len(model.model.layers) == NUM_LAYERS
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    removed = model_factory()()
    from swift_gradpruner.surgery import remove_layers

    remove_layers(removed, [1, 3, 4])
    assert viewed == pytest.approx(reference.answer_loss(removed, calibration()), rel=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_skip_loss_first_round_is_the_brute_force_minimum(arch):
    factory = model_factory(arch)
    batches = calibration()
    losses = reference.skip_loss_first(factory, batches)
    order = criteria.skip_loss_order(factory(), batches, 3)
    assert order[0][0] == min(range(NUM_LAYERS), key=lambda j: losses[j])
    assert order[0][1] == pytest.approx(min(losses), rel=1e-5)
    # Later rounds: the loss reported equals the model with all removed-so-far layers deleted.
    from swift_gradpruner.surgery import remove_layers

    model = factory()
    remove_layers(model, [j for j, _ in order])
    assert order[-1][1] == pytest.approx(reference.answer_loss(model, batches), rel=1e-5)
    assert len({j for j, _ in order}) == 3
    # A shorter order is the start of a longer one, and continuing it gives the longer one.
    assert criteria.skip_loss_order(factory(), batches, 2) == order[:2]
    assert criteria.skip_loss_order(factory(), batches, 3, order[:1]) == order


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_kl_first_round_and_later_rounds_match_pruned_copies(arch):
    factory = model_factory(arch)
    batches = calibration()
    kls = reference.kl_first(factory, batches)
    order = criteria.greedy_order(factory(), batches, 3, "kl")
    assert order[0][0] == min(range(NUM_LAYERS), key=lambda j: (kls[j], -j))
    assert order[0][1] == pytest.approx(min(kls), rel=1e-4)
    from swift_gradpruner.surgery import remove_layers

    model = factory()
    remove_layers(model, [j for j, _ in order])
    assert order[-1][1] == pytest.approx(reference.kl_to(factory(), model, batches), rel=1e-4)
    assert criteria.greedy_order(factory(), batches, 3, "kl", order[:1]) == order
    removed, measured = criteria.removed_layers(factory(), "kl", 3, batches)
    assert removed == [j for j, _ in order]
    assert measured["kl_removing_one_layer"] == pytest.approx(kls, rel=1e-4)  # the plotted per-layer values
    # The dense model against itself: no damage, also with a large vocabulary (the closed form subtracts
    # numbers of the logits' size; in float32 that left ~1e-4 on SmolLM2's 49k vocabulary). What is left
    # is the rounding of the float32 logits the pruned side's logsumexp is taken of: two float32 ulps
    # of the largest logit (1.2e-6 measured here at logits x 50; a lost term would be of order 1).
    for dense in (factory(), build_model(arch, num_layers=2, vocab_size=16384, seed=1).eval()):
        with torch.no_grad():
            dense.lm_head.weight.mul_(50.0)  # confident, large logits
            largest = max(float(dense(**{k: b[k] for k in ("input_ids", "attention_mask")}).logits.abs().max())
                          for b in batches)  # fmt: skip
        ulps = 2 * torch.finfo(torch.float32).eps * largest
        assert measures.mean_kl(dense, batches, measures.reference_of(dense, batches)) == pytest.approx(0, abs=ulps)


def test_kl_of_a_soft_capped_head_matches_full_logits():
    """Gemma 2 soft-caps its logits (not linear in the hidden state): the KL keeps dense hidden states."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gemma2", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                  final_logit_softcapping=2.0)  # fmt: skip
    torch.manual_seed(0)
    dense, noisy = AutoModelForCausalLM.from_config(config).eval(), AutoModelForCausalLM.from_config(config).eval()
    noisy.load_state_dict(dense.state_dict())
    with torch.no_grad():
        noisy.model.layers[1].mlp.down_proj.weight.mul_(30.0)
        noisy.model.norm.weight.fill_(20.0)  # logits far into the soft cap (the head stays the dense one)
    batches = calibration()
    targets = measures.reference_of(dense, batches)
    assert targets[0].states is not None and targets[0].u is None  # hidden states, recomputed dense logits
    expected = reference.kl_to(dense, noisy, batches)
    assert expected > 1e-3
    assert measures.mean_kl(noisy, batches, targets) == pytest.approx(expected, rel=1e-3, abs=1e-6)
    # The answer loss of skip_loss and the guard is the model's own (soft-capped) loss too.
    assert measures.mean_loss(noisy, batches) == pytest.approx(reference.answer_loss(noisy, batches), rel=1e-5)


def test_greedy_search_never_chooses_a_nan_and_stops_when_all_are():
    """A layer whose output is NaN: removing it is the only finite choice (the old search removed layer 0)."""
    model = model_factory()()
    with torch.no_grad():
        model.model.layers[3].mlp.down_proj.weight.fill_(float("nan"))
    order = criteria.greedy_order(model, calibration(), 1, "skip_loss")
    assert order[0][0] == 3
    with pytest.raises(measures.NonFiniteError, match="float32"):
        criteria.greedy_order(model, calibration(), 1, "kl")  # the dense reference itself is NaN


def test_block_influence_and_angular_match_references():
    model = model_factory()()
    batches = calibration()
    assert criteria.block_influence(model, batches) == pytest.approx(
        reference.block_influence(model, batches), abs=1e-5
    )
    for size in (1, 3):
        start, distances = criteria.angular_block(model, batches, size)
        expected = reference.angular_distances(model, batches, size)
        assert distances == pytest.approx(expected, abs=1e-5)
        assert start == min(range(len(expected)), key=lambda s: (expected[s], -s))


def test_block_influence_stops_on_an_overflowing_float16_model():
    """Issue 25 item 5: a float16 layer that overflows gives inf hidden states and NaN cosines, which would
    sort arbitrarily; Block Influence stops with one line naming the dtype and the fix."""
    from swift_gradpruner.config import GradPruneConfigError

    model = model_factory()().half()
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.mul_(1e6)  # beyond float16's 65504
    with pytest.raises(GradPruneConfigError, match="float16") as caught:
        criteria.block_influence(model, calibration())
    assert "\n" not in str(caught.value) and "NaN/inf for layers [2, " in str(caught.value)
    with pytest.raises(GradPruneConfigError, match="bfloat16 or float32"):
        prune_model(model, None, GradPruneConfig(prune_layers=2, score="block_influence", benchmark=False),
                    calibration=calibration())  # fmt: skip
    assert model.config.num_hidden_layers == NUM_LAYERS  # nothing was removed


def test_last_and_random_layers():
    assert criteria.last_layers(30, 6) == [23, 24, 25, 26, 27, 28]
    picked = criteria.random_layers(30, 12, seed=1)
    assert len(set(picked)) == 12 and picked == criteria.random_layers(30, 12, seed=1)
    with pytest.raises(ValueError):
        criteria.last_layers(6, 5)


@pytest.mark.parametrize("score", ["squared", "norm", *REMOVAL_CRITERIA])
@pytest.mark.parametrize("merge", [0, 1])
def test_every_criterion_removes_exactly_n_through_prune_model(score, merge):
    model = model_factory()()
    accumulator = IGIAAccumulator()
    for grads in random_lora_grads(model, steps=2):
        accumulator.update(grads)
    config = GradPruneConfig(prune_layers=3, merge_layers=merge, score=score, benchmark=False)
    result = prune_model(model, accumulator, config, calibration=calibration())
    assert len(result.plan.removed) == 3
    # A removed block at the start has nothing to merge into: the shortfall is reported.
    assert len(result.plan.merged) + result.report["merge_shortfall"] == merge
    assert model.config.num_hidden_layers == NUM_LAYERS - 3
    assert result.report["criterion"]["name"] == score
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]))


def test_criteria_without_calibration_or_gradients_fail_clearly():
    model = model_factory()()
    with pytest.raises(ValueError, match="calibration"):
        prune_model(model, None, GradPruneConfig(prune_layers=2, merge_layers=0, score="skip_loss", benchmark=False))
    with pytest.raises(ValueError, match="IGIA gradients"):
        prune_model(model, None, GradPruneConfig(prune_layers=2, merge_layers=1, score="last", benchmark=False))
