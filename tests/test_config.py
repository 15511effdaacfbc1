import pytest

from swift_gradpruner.config import MIN_STEPS, GradPruneConfig, GradPruneConfigError


def test_defaults_are_the_papers():
    c = GradPruneConfig()
    assert (c.topp, c.merge_mode, c.step_ratio) == (0.2, "add", 0.01)
    assert (c.lora_rank, c.lora_alpha) == (8, 32)
    # Merged layers: none by default (measured, docs/accuracy.md); None = the paper's share, 3 of its 13
    # removed; an explicit count wins, capped at the removed.
    assert c.merge_layers == 0 and c.merge_count(13) == 0
    paper = GradPruneConfig(merge_layers=None)
    assert [paper.merge_count(n) for n in (13, 12, 6, 4, 2)] == [3, 3, 1, 1, 0]
    assert [GradPruneConfig(merge_layers=2).merge_count(n) for n in (13, 1)] == [2, 1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prune_ratio=0.0), "gradprune prune_ratio=0.0 is invalid: must be in (0, 1)"),
        (dict(prune_ratio=1.0), "gradprune prune_ratio=1.0 is invalid: must be in (0, 1)"),
        (dict(prune_ratio=float("nan")), "gradprune prune_ratio=nan is invalid"),
        (dict(prune_layers=0), "gradprune prune_layers=0 is invalid: must be an integer >= 1"),
        (dict(prune_layers=2.5), "gradprune prune_layers=2.5 is invalid"),
        (dict(prune_layers=4, prune_ratio=0.3), "set either prune_layers or prune_ratio, not both"),
        (
            dict(prune_layers=2, merge_layers=3),
            "gradprune merge_layers=3 is invalid: must be <= prune_layers (2)",
        ),
        (dict(merge_layers=-1), "gradprune merge_layers=-1 is invalid: must be an integer >= 0"),
        (dict(topp=0), "gradprune topp=0 is invalid: must be in (0, 1]"),
        (dict(topp=1.5), "gradprune topp=1.5 is invalid: must be in (0, 1]"),
        (dict(steps=0), "gradprune steps=0 is invalid: must be an integer >= 2"),
        (dict(steps=-3), "gradprune steps=-3 is invalid"),
        (dict(step_ratio=0), "gradprune step_ratio=0 is invalid: must be in (0, 1)"),
        (
            dict(merge_mode="sum"),
            "gradprune merge_mode='sum' is invalid: must be one of add, average, fisher",
        ),
        (dict(score="l1"), "gradprune score='l1' is invalid: must be one of squared, norm"),
        (dict(lora_rank=0), "gradprune lora_rank=0 is invalid"),
        (dict(benchmark="yes"), "gradprune benchmark='yes' is invalid: must be true or false"),
        (dict(keep_state="no"), "gradprune keep_state='no' is invalid: must be true or false"),
    ],
)
def test_bad_values_raise_one_line_errors(kwargs, message):
    with pytest.raises(GradPruneConfigError) as info:
        GradPruneConfig(**kwargs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_one_phase1_step_is_refused_it_has_no_gradient():
    """Issue 18 item 4: LoRA B starts at 0, so step 1's simulated gradient is zero for every linear; a
    phase 1 of one step scores every layer 0 and the tie-break alone would choose the layers."""
    with pytest.raises(GradPruneConfigError, match="steps=1 is invalid: must be an integer >= 2"):
        GradPruneConfig(steps=1)
    assert GradPruneConfig(steps=2).phase1_steps(3) == 2
    with pytest.raises(GradPruneConfigError, match="phase 1 needs at least 2 of them"):
        GradPruneConfig().phase1_steps(2)  # the default t would be 1 of T = 2


def test_what_reads_the_gradients():
    assert not GradPruneConfig(score="block_influence").needs_gradients
    assert GradPruneConfig(score="squared").needs_gradients and GradPruneConfig(score="norm").needs_gradients
    assert GradPruneConfig(score="block_influence", merge_layers=None).needs_gradients  # the paper's share merges
    assert GradPruneConfig(score="last", merge_layers=1).needs_factors
    assert not GradPruneConfig(score="squared").needs_factors and GradPruneConfig(keep_state=True).needs_factors


def test_phase1_steps():
    assert GradPruneConfig().phase1_steps(10_000) == 100  # 1% of T
    assert GradPruneConfig().phase1_steps(300) == MIN_STEPS  # at least the minimum
    assert GradPruneConfig().phase1_steps(6) == 5  # but always leaves a phase-2 step
    assert GradPruneConfig(steps=3).phase1_steps(6) == 3
    with pytest.raises(GradPruneConfigError, match="steps=6 is invalid: must be < the run's 6 optimizer steps"):
        GradPruneConfig(steps=6).phase1_steps(6)
    with pytest.raises(GradPruneConfigError, match="at least 2"):
        GradPruneConfig().phase1_steps(1)


def test_round_trip_and_unknown_keys():
    c = GradPruneConfig(prune_layers=4, merge_layers=1, merge_mode="fisher")
    assert GradPruneConfig.from_dict(c.to_dict()) == c
    with pytest.raises(GradPruneConfigError, match=r"unknown GradPruner option\(s\) \['prune_layer'\]"):
        GradPruneConfig.from_dict({"prune_layer": 3})


def test_phase1_options_without_phase1_say_they_do_nothing():
    """Issue 24 item 5: --gradprune_steps / keep_state with a criterion that reads no gradients."""
    lines = GradPruneConfig(steps=20, keep_state=True).unused_options()
    assert [line.split(" does nothing")[0] for line in lines] == ["--gradprune_steps 20", "--gradprune_keep_state true"]
    assert all("--gradprune_score block_influence" in line and "\n" not in line for line in lines)
    assert GradPruneConfig(steps=20, keep_state=True, score="squared").unused_options() == []
    assert GradPruneConfig(steps=20, merge_layers=1).unused_options() == []  # a merge reads phase 1
    assert GradPruneConfig().unused_options() == []
