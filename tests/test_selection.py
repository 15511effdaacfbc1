import pytest

from swift_gradpruner.config import GradPruneConfig, GradPruneConfigError
from swift_gradpruner.selection import layers_to_remove, plan_layers


def test_removes_lowest_and_merges_highest_removed_into_preceding_retained():
    scores = [9.0, 1.0, 8.0, 2.0, 3.0, 7.0, 0.5, 6.0]
    plan = plan_layers(scores, remove=4, merge=2)
    assert plan.removed == (1, 3, 4, 6)
    assert plan.kept == (0, 2, 5, 7)
    # Highest-scoring removed layers are 4 (3.0) and 3 (2.0); both merge into retained layer 2.
    assert dict(plan.merged) == {3: 2, 4: 2}
    assert plan.dropped == (1, 6)


def test_layer_zero_has_no_predecessor_and_is_dropped_not_merged():
    scores = [0.1, 0.2, 5.0, 6.0]
    plan = plan_layers(scores, remove=2, merge=1)
    assert plan.removed == (0, 1)
    assert dict(plan.merged) == {} and plan.dropped == (0, 1)
    plan = plan_layers([0.3, 5.0, 0.1, 6.0], remove=2, merge=1)
    # Layer 0 scores higher than layer 2 but cannot merge: layer 2 (-> 1) is merged instead.
    assert dict(plan.merged) == {2: 1} and plan.dropped == (0,)


def test_ties_remove_deeper_layers_first_and_are_deterministic():
    plan = plan_layers([1.0, 1.0, 1.0, 1.0, 1.0], remove=2, merge=1)
    assert plan.removed == (3, 4)
    assert dict(plan.merged) == {3: 2} and plan.dropped == (4,)
    assert plan_layers([1.0] * 5, 2, 1) == plan


def test_remove_zero_layers_is_identity():
    plan = plan_layers([1.0, 2.0, 3.0], remove=0, merge=0)
    assert plan.removed == () and plan.kept == (0, 1, 2)


def test_non_finite_scores_are_rejected():
    with pytest.raises(ValueError, match="finite"):
        plan_layers([1.0, float("nan"), 2.0], 1, 0)


def test_count_from_prune_layers_and_from_ratio():
    layer = [100] * 8
    assert layers_to_remove(GradPruneConfig(prune_layers=3, merge_layers=1), len(layer)) == 3
    # Of the 8 layers: 0.4 -> 3.2 -> 3 layers; 0.4375 -> 3.5 -> tie -> 3 (fewer); 0.45 -> 4.
    assert layers_to_remove(GradPruneConfig(prune_ratio=0.4, merge_layers=1), len(layer)) == 3
    assert layers_to_remove(GradPruneConfig(prune_ratio=0.4375, merge_layers=1), len(layer)) == 3
    assert layers_to_remove(GradPruneConfig(prune_ratio=0.45, merge_layers=1), len(layer)) == 4
    # Default: 40% of the decoder layers.
    assert layers_to_remove(GradPruneConfig(merge_layers=1), len(layer)) == 3


def test_paper_setting_on_llama_3_1_8b_shapes():
    # Llama-3.1-8B: 32 layers of 218,112,000 parameters, 2 x 525,336,576 in embeddings + lm_head,
    # 262,144 in the final norm... 13 layers is 35% of all parameters, 40.6% of the layers': the paper's "40%".
    layer = [218_112_000] * 32
    assert layers_to_remove(GradPruneConfig(prune_layers=13), len(layer)) == 13
    assert layers_to_remove(GradPruneConfig(prune_ratio=0.4), len(layer)) == 13


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(prune_layers=8), "prune_layers=8 is invalid: the model has 8 decoder layers"),
        (dict(prune_ratio=0.01), "prune_ratio=0.01 is invalid for this model: one of its 8 decoder layers is 12.5%"),
        (dict(prune_ratio=0.95), "would remove 8 of its 8 decoder layers"),
        (dict(prune_ratio=0.2, merge_layers=3), "merge_layers=3 is invalid: only 2 layers are removed"),
    ],
)
def test_model_dependent_errors(config, match):
    with pytest.raises(GradPruneConfigError, match=match):
        layers_to_remove(GradPruneConfig(**config), 8)


# (hidden, intermediate, layers, heads, kv heads, vocab, tied): the released configs' shapes.
REAL_SHAPES = {
    "llama-3.1-8b": ("llama", 4096, 14336, 32, 32, 8, 128256, False, 13),
    "mistral-7b-v0.3": ("mistral", 4096, 14336, 32, 32, 8, 32768, False, 13),
    "qwen2.5-7b": ("qwen2", 3584, 18944, 28, 28, 4, 152064, False, 11),
    "smollm2-135m (tied)": ("llama", 576, 1536, 30, 9, 3, 49152, True, 12),
}


@pytest.mark.parametrize("name", list(REAL_SHAPES))
def test_prune_ratio_is_a_share_of_the_decoder_layer_parameters(name):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from swift_gradpruner.architecture import parameter_counts

    arch, hidden, ffn, layers, heads, kv, vocab, tied, expected = REAL_SHAPES[name]
    config = AutoConfig.for_model(arch, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                                  num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                                  tie_word_embeddings=tied)  # fmt: skip
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    per_layer, total = parameter_counts(model)
    count = layers_to_remove(GradPruneConfig(prune_ratio=0.4), len(per_layer))
    assert count == expected  # the paper: 13 of Llama-3.1-8B's 32 layers is its "40%"
    share = count * per_layer[0] / sum(per_layer)
    assert abs(share - 0.4) <= 0.5 / layers + 1e-9
    assert count * per_layer[0] / total < share  # of all parameters it is less: embeddings stay
