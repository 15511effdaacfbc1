"""The report's dense-vs-pruned inference benchmark: what it runs and how it reports (no timing asserts)."""

import pytest
import torch

from swift_gradpruner.inference_timing import InferenceTiming, compare, time_inference, time_on_device
from swift_gradpruner.tiny import build_model


def test_generation_runs_the_full_length_even_when_eos_is_the_argmax():
    model = build_model("llama", num_layers=2, vocab_size=64)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: greedy picks token 0 ...
    model.generation_config.eos_token_id = 0  # ... which is eos, so an unforced generate stops at once
    timing = time_inference(model, "cpu", prompt_tokens=8, new_tokens=5, repeats=2)
    assert (timing.batch, timing.prompt_tokens, timing.new_tokens) == (1, 8, 5)
    assert timing.prefill_ms > 0 and timing.generate_ms > 0


def test_prompt_is_shortened_to_fit_the_position_limit():
    model = build_model("qwen2", num_layers=1, vocab_size=64)
    model.config.max_position_embeddings = 40
    timing = time_inference(model, "cpu", prompt_tokens=128, new_tokens=8, repeats=1)
    assert timing.prompt_tokens == 32


def test_time_on_device_restores_place_and_mode():
    model = build_model("llama", num_layers=1, vocab_size=64)
    model.train()
    timing = time_on_device(model, "cpu")
    assert isinstance(timing, InferenceTiming) and timing.prompt_tokens == 128 and timing.new_tokens == 32
    assert model.training and next(model.parameters()).device.type == "cpu"


def test_compare_gives_dense_over_pruned_ratios_or_the_skip_reason():
    dense = InferenceTiming(prefill_ms=30.0, generate_ms=90.0, batch=1, prompt_tokens=128, new_tokens=32)
    pruned = InferenceTiming(prefill_ms=20.0, generate_ms=60.0, batch=1, prompt_tokens=128, new_tokens=32)
    entry = compare(dense, pruned, "cpu", "bfloat16")
    assert entry["prefill_speedup"] == pytest.approx(1.5) and entry["generate_speedup"] == pytest.approx(1.5)
    assert entry["dense"]["prefill_ms"] == 30.0 and entry["pruned"]["generate_ms"] == 60.0
    skipped = compare("out of memory on cuda: ...", pruned, "cuda", "bfloat16")
    assert skipped == {"device": "cuda", "dtype": "bfloat16", "skipped": "out of memory on cuda: ..."}
