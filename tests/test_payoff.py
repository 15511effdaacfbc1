"""The break-even estimate and the whole-run comparison (payoff.py, pure arithmetic)."""

import pytest

from swift_gradpruner.payoff import WholeRun, criterion_passes, estimate


def test_criterion_passes():
    assert criterion_passes("squared", 12, 30) == criterion_passes("last", 12, 30) == 0
    assert criterion_passes("block_influence", 12, 30) == 1
    # Greedy: per round one caching pass and half the remaining layers' tails: 12 + (30 + 29 + ... + 19) / 2.
    assert criterion_passes("skip_loss", 12, 30) == 12 + sum(range(19, 31)) / 2 == criterion_passes("kl", 12, 30)


def test_a_short_run_does_not_pay_off_and_a_long_one_does():
    settings = dict(phase1_steps=10, criterion="skip_loss", remove=12, layers=30, calibration_rows=16, guard_rows=32,
                    rows_per_step=8, kept_fraction=0.68)  # fmt: skip
    short = estimate(total_steps=75, **settings)
    assert short.fixed_steps == pytest.approx(10 + 159 * 16 / 24 + 7 * 32 / 24)
    assert not short.pays_off() and "it pays off from about" in short.message()
    assert estimate(total_steps=short.break_even_steps + 1, **settings).pays_off()


def test_whole_run_against_the_dense_estimate():
    run = WholeRun(total_s=300, startup_s=10, stages_s={"phase 1": 40}, phase2_s=150, phase2_train_s=100,
                   step_ratio=0.5, ratio_source="measured")  # fmt: skip
    assert run.dense_estimate_s == 10 + 150 + 100  # the dense run trains twice as long
    assert run.ratio == pytest.approx(300 / 260) and "slower than not pruning" in run.line()
