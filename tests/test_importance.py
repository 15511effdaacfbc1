import math

import pytest
import torch

import reference
from swift_gradpruner.capture import lora_pairs, read_lora_grads
from swift_gradpruner.importance import IGIAAccumulator, layer_scores
from swift_gradpruner.tiny import llama_linear_shapes

# Llama-like shapes with GQA (k/v project to fewer rows than q) and m != n everywhere in the MLP.
RANK = 4
SHAPES = llama_linear_shapes(hidden=48, kv=16, ffn=80)


def random_steps(num_layers=3, steps=5, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        grads = {}
        for j in range(num_layers):
            for suffix, (m, n) in SHAPES.items():
                # Layers get different magnitudes so that their scores differ by orders.
                s = scale * (j + 1)
                grads[f"model.layers.{j}.{suffix}"] = (
                    torch.randn(RANK, n, generator=gen) * s,
                    torch.randn(m, RANK, generator=gen) * s,
                )
        out.append(grads)
    return out


def fed(steps, **kw):
    acc = IGIAAccumulator(**kw)
    for grads in steps:
        acc.update(grads)
    return acc


@pytest.mark.parametrize("scale", [1.0, 1e-7])
def test_scores_and_igia_match_brute_force(scale):
    steps = random_steps(scale=scale)
    acc = fed(steps)
    ref = reference.igia(steps)
    scores = acc.linear_scores("squared")
    assert set(scores) == set(ref)
    for name, f in ref.items():
        assert scores[name] == pytest.approx(float(f.sum()), rel=1e-5)
        rebuilt = acc.igia(name)
        assert rebuilt.shape == f.shape and rebuilt.dtype == torch.float64
        torch.testing.assert_close(rebuilt, f, rtol=1e-5, atol=0)
    norms = reference.frobenius_norm_mean(steps)
    for name, value in acc.linear_scores("norm").items():
        assert value == pytest.approx(norms[name], rel=1e-5)
    assert acc.counts.used == 5 and acc.counts.skipped_nonfinite == 0 and acc.counts.zero == 0
    assert acc.factor_bytes == 5 * sum(4 * RANK * (m + n) for m, n in SHAPES.values()) * 3


def test_layer_scores_sum_linears_of_each_layer():
    steps = random_steps(num_layers=3)
    ref = reference.igia(steps)
    acc = fed(steps)
    linear = acc.linear_scores()
    linear["lm_head"] = 123.0
    scores, outside = layer_scores(linear, 3)
    assert outside == ["lm_head"]
    for j in range(3):
        expected = sum(float(f.sum()) for name, f in ref.items() if name.startswith(f"model.layers.{j}."))
        assert scores[j] == pytest.approx(expected, rel=1e-5)
    assert scores[0] < scores[1] < scores[2]


def test_nonfinite_steps_are_skipped_and_zero_steps_count():
    steps = random_steps(steps=3)
    zero = {n: (torch.zeros_like(a), b) for n, (a, b) in steps[0].items()}  # LoRA B = 0 -> gA = 0
    bad = {n: (a.clone(), b) for n, (a, b) in steps[1].items()}
    bad["model.layers.1.mlp.up_proj"][0][0, 0] = math.nan
    acc = IGIAAccumulator()
    assert acc.update(zero)
    assert not acc.update(bad)
    assert acc.update(steps[2])
    assert acc.counts.used == 2 and acc.counts.skipped_nonfinite == 1 and acc.counts.zero == 1
    ref = reference.igia([zero, steps[2]])  # the zero step dilutes the mean, the NaN one is gone
    for name, f in ref.items():
        assert acc.linear_scores()[name] == pytest.approx(float(f.sum()), rel=1e-5)
        torch.testing.assert_close(acc.igia(name), f, rtol=1e-5, atol=0)


def test_no_usable_step_and_unknown_linear_are_clear_errors():
    acc = IGIAAccumulator()
    with pytest.raises(ValueError, match="no usable gradient step"):
        acc.linear_scores()
    acc.update(random_steps(steps=1)[0])
    with pytest.raises(KeyError, match="lm_head"):
        acc.igia("lm_head")
    with pytest.raises(ValueError, match="changed between steps"):
        acc.update({"model.layers.0.mlp.up_proj": (torch.ones(2, 3), torch.ones(4, 2))})
    lean = IGIAAccumulator(keep_factors=False)
    lean.update(random_steps(steps=1)[0])
    assert lean.factor_bytes == 0
    with pytest.raises(ValueError, match="keep_factors=False"):
        lean.igia("model.layers.0.mlp.up_proj")


def test_gradients_of_a_real_peft_lora_llama(tokenizer):
    """Real LoRA training steps on a tiny Llama: accumulator == brute force on the same gradients."""
    from peft import LoraConfig, get_peft_model

    from swift_gradpruner.tiny import build_model, chat_rows

    model = build_model("llama", num_layers=3, vocab_size=len(tokenizer))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    pairs = lora_pairs(model)
    assert len(pairs) == 3 * 7 and pairs[0].name == "model.layers.0.self_attn.q_proj"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in chat_rows(16)]
    acc, recorded = IGIAAccumulator(), []
    for step in range(4):
        batch = tokenizer(texts[4 * step : 4 * step + 4], return_tensors="pt", padding=True)
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        grads = read_lora_grads(pairs)
        recorded.append({n: (a.clone(), b.clone()) for n, (a, b) in grads.items()})
        acc.update(grads)
        opt.step()
        opt.zero_grad()
    # Step 1: B = 0 at init, so every gA and every simulated gradient is zero; later steps are not.
    assert acc.counts.zero == 1 and acc.counts.used == 4
    ref = reference.igia(recorded)
    scores = acc.linear_scores()
    assert all(v > 0 for v in scores.values())
    for name, f in ref.items():
        assert scores[name] == pytest.approx(float(f.sum()), rel=1e-5)
    name = "model.layers.1.mlp.down_proj"
    torch.testing.assert_close(acc.igia(name), ref[name], rtol=1e-5, atol=0)


def test_factors_on_disk_give_the_same_scores_and_igia(tmp_path):
    steps = random_steps(steps=4)
    steps.insert(2, {n: (a * float("nan"), b) for n, (a, b) in steps[0].items()})  # skipped, never written
    memory = fed(steps)
    disk = fed(steps, factor_dir=tmp_path / "f")
    assert disk.factor_bytes == 0 and disk.factor_disk_bytes > 0 and memory.factor_bytes > 0
    assert len(list((tmp_path / "f").glob("*.safetensors"))) == 4 and disk.counts == memory.counts
    assert disk.linear_scores() == memory.linear_scores()
    expected = reference.igia([s for i, s in enumerate(steps) if i != 2])
    for name in ("model.layers.1.mlp.down_proj", "model.layers.2.self_attn.k_proj"):
        assert torch.equal(disk.igia(name), memory.igia(name))
        torch.testing.assert_close(disk.igia(name), expected[name], rtol=1e-10, atol=0)


@pytest.mark.parametrize("on_disk", [False, True])
def test_saved_state_rebuilds_scores_and_f_exactly(tmp_path, on_disk):
    from swift_gradpruner.importance import STATE_FILE, load_state, save_state

    steps = random_steps(steps=3, scale=1e-6)
    acc = fed(steps, factor_dir=tmp_path / "state" if on_disk else None)
    save_state(acc, tmp_path / "state")
    assert (tmp_path / "state" / STATE_FILE).is_file()
    again = load_state(tmp_path / "state")
    assert again.counts == acc.counts and again.linear_names == acc.linear_names
    assert again.linear_scores() == acc.linear_scores() and again.linear_scores("norm") == acc.linear_scores("norm")
    name = "model.layers.0.mlp.up_proj"
    assert torch.equal(again.igia(name), acc.igia(name))
    if not on_disk:
        assert acc.factor_bytes > 0  # saving does not move an in-memory accumulator's factors
    (tmp_path / "state" / "step-000002.safetensors").unlink()
    with pytest.raises(ValueError, match="incomplete IGIA state"):
        load_state(tmp_path / "state")
    with pytest.raises(FileNotFoundError, match="no IGIA state"):
        load_state(tmp_path)


def test_a_state_without_factors_keeps_the_scores_and_frees_the_disk(tmp_path):
    """Issue 18 item 8: the factors are written only when a merge reads them, and deleted after pruning;
    the sums alone still give the scores when the state is loaded again."""
    from swift_gradpruner.importance import drop_factors, load_state, save_state, state_has_factors

    steps = random_steps(steps=3, scale=1e-6)
    sums_only = fed(steps, keep_factors=False)
    save_state(sums_only, tmp_path / "sums")
    assert not list((tmp_path / "sums").glob("step-*")) and not state_has_factors(tmp_path / "sums")
    again = load_state(tmp_path / "sums")
    assert again.linear_scores() == fed(steps).linear_scores() and again.counts == sums_only.counts
    with pytest.raises(ValueError, match="keep_factors=False; F cannot be rebuilt"):
        again.igia("model.layers.0.mlp.up_proj")

    full = fed(steps, factor_dir=tmp_path / "full")
    save_state(full, tmp_path / "full")
    assert state_has_factors(tmp_path / "full") and len(list((tmp_path / "full").glob("step-*"))) == 3
    size = full.factor_disk_bytes
    assert drop_factors(tmp_path / "full") == size > 0
    assert not list((tmp_path / "full").glob("step-*")) and not state_has_factors(tmp_path / "full")
    assert load_state(tmp_path / "full").linear_scores() == full.linear_scores()


def test_igia_in_step_chunks_equals_the_reference(monkeypatch):
    from swift_gradpruner import importance

    monkeypatch.setattr(importance, "STEP_CHUNK", 2)  # 5 steps: chunks of 2, 2, 1
    steps = random_steps(steps=5)
    acc = fed(steps)
    expected = reference.igia(steps)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.2.mlp.gate_proj"):
        torch.testing.assert_close(acc.igia(name), expected[name], rtol=1e-10, atol=0)
