"""Every supported family, in memory (seconds): the decoder layers are where ms-swift finds them, a layer
removal keeps the per-layer config right (reload == in-memory model, KV-cache generation == no-cache
forward), a removal the config cannot express is refused, and MoE merges only corresponding linears."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reference
from conftest import random_lora_grads
from swift_gradpruner import layer_config
from swift_gradpruner.architecture import auto_class, decoder, final_norm, layers_prefix, lm_head, text_config
from swift_gradpruner.config import GradPruneConfig, GradPruneConfigError
from swift_gradpruner.coverage import incomplete_layers, uncovered
from swift_gradpruner.families import FAMILIES
from swift_gradpruner.importance import IGIAAccumulator
from swift_gradpruner.layer_config import LayerRemovalError, check_removal
from swift_gradpruner.merge import merge_priority, merge_removed_layers
from swift_gradpruner.prune import prune_model
from swift_gradpruner.selection import plan_removal
from swift_gradpruner.surgery import remove_layers
from swift_gradpruner.tiny_families import build_family, build_family_tokenizer, create_family, family_config

NEW = [f for f in FAMILIES if f.model_type not in ("llama", "mistral", "qwen2", "qwen3")]
# Layers removed per family: each breaks a naive config (an index rule or a per-layer list) if it is kept as is.
REMOVED = {"qwen2_moe": [0], "qwen3_next": [0], "qwen3_moe": [1], "glm4_moe": [1], "deepseek_v3": [0, 1]}


@pytest.fixture(scope="module")
def vocab() -> int:
    return len(build_family_tokenizer())


def swift_layer_list(model: nn.Module, swift_model_type: str) -> str:
    """The decoder layer list's module path as ms-swift's LISA callback finds it (swift/callbacks/lisa.py)."""
    from swift.model import MODEL_MAPPING

    arch = MODEL_MAPPING[swift_model_type].model_arch
    prefixes = [arch.module_list] if getattr(arch, "module_list", None) else getattr(arch, "language_model", None)
    excluded = [p for key in ("vision_tower", "aligner", "generator") for p in getattr(arch, key, None) or []]
    for name, module in model.named_modules():
        if prefixes and not any(name == p or name.startswith(f"{p}.") for p in prefixes):
            continue
        if any(name == p or name.startswith(f"{p}.") for p in excluded):
            continue
        if isinstance(module, nn.ModuleList):
            return name
    raise AssertionError("no layer list")


@pytest.mark.parametrize("family", FAMILIES, ids=[f.model_type for f in FAMILIES])
def test_decoder_norm_and_head_are_where_swift_finds_them(family, vocab):
    config = family_config(family.model_type, vocab)
    with torch.device("meta"):
        model = auto_class(config)(config)
    assert layers_prefix(model) == swift_layer_list(model, family.swift_model_type) + "."
    assert len(decoder(model).layers) == text_config(model.config).num_hidden_layers == 4
    names = {module: name for name, module in model.named_modules()}
    assert names[final_norm(model)] == layers_prefix(model).replace("layers.", "norm")
    assert names[lm_head(model)] == "lm_head"
    vision = {n.split(".")[1] for n in names.values() if n.startswith("model.") and "vision" in n}
    assert bool(vision) == family.vision  # a vision tower exists exactly for the vision-language family


def greedy_with_cache(model, ids: torch.Tensor, new: int = 6):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, use_cache=True, output_logits=True, return_dict_in_generate=True)  # fmt: skip
    return out.sequences, torch.stack([step[0] for step in out.logits])


def assert_reload_and_cache(model, folder, vocab: int) -> nn.Module:
    """from_pretrained(folder) gives the in-memory model's logits; KV-cache generation (linear-attention state
    too) gives the no-cache forward's logits at every step. Returns the reloaded model."""
    model.save_pretrained(folder)
    reloaded = auto_class(model.config).from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(40, vocab, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
        sequence, cached = greedy_with_cache(reloaded, ids[:1, :18])
        full = reloaded(sequence, use_cache=False).logits[0, 17:-1]
    torch.testing.assert_close(cached, full, atol=2e-5, rtol=1e-4)
    return reloaded


@pytest.mark.parametrize("family", NEW, ids=[f.model_type for f in NEW])
def test_removal_reloads_and_caches_like_the_pruned_model(family, vocab, tmp_path):
    model = build_family(family.model_type, vocab)
    before = [_kind(layer) for layer in decoder(model).layers]
    removed = REMOVED.get(family.model_type, [1])
    kept = [j for j in range(4) if j not in removed]
    remove_layers(model, removed)
    reloaded = assert_reload_and_cache(model, tmp_path / "pruned", vocab)
    assert [_kind(layer) for layer in decoder(reloaded).layers] == [before[j] for j in kept]
    assert [layer.self_attn.layer_idx if hasattr(layer, "self_attn") else layer.linear_attn.layer_idx
            for layer in decoder(reloaded).layers] == list(range(len(kept)))  # fmt: skip
    config = text_config(reloaded.config)
    if getattr(config, "layer_types", None) and "linear_attention" in config.layer_types:
        cache = reloaded(torch.tensor([[40, 41, 42]]), use_cache=True).past_key_values
        linear = [type(layer).__name__ == "LinearAttentionLayer" for layer in cache.layers]
        assert linear == [kind == "linear_attention" for kind in config.layer_types]


def _kind(layer: nn.Module) -> tuple:
    """What a decoder layer is: its attention and MLP classes and any sliding window or layer type."""
    attention = getattr(layer, "self_attn", None) or getattr(layer, "linear_attn", None)
    mlp = getattr(layer, "mlp", None)
    return (type(attention).__name__, type(mlp).__name__, getattr(attention, "sliding_window", None),
            getattr(attention, "layer_type", None))  # fmt: skip


def test_index_rules_become_explicit(vocab):
    """decoder_sparse_step 2 (experts on layers 1, 3) without layer 0: explicit form; first_k_dense_replace
    renumbered; mlp_only_layers renumbered; layer_types sliced."""
    qwen = build_family("qwen2_moe", vocab)
    remove_layers(qwen, [0])
    assert (qwen.config.decoder_sparse_step, qwen.config.mlp_only_layers) == (1, [1])
    glm = build_family("glm4_moe", vocab)  # first_k_dense_replace 2: layers 0, 1 dense
    remove_layers(glm, [0])
    assert glm.config.first_k_dense_replace == 1 and glm.config.num_hidden_layers == 3
    qwen3 = build_family("qwen3_moe", vocab)  # mlp_only_layers [0, 2]
    remove_layers(qwen3, [1])
    assert qwen3.config.mlp_only_layers == [0, 1]
    gemma = build_family("gemma3_text", vocab)
    remove_layers(gemma, [0])
    assert gemma.config.layer_types == ["full_attention", "sliding_attention", "full_attention"]


def test_a_removal_the_config_cannot_express_is_refused_before_any_change(vocab, monkeypatch):
    """Without the explicit form of Qwen-MoE's decoder_sparse_step rule, removing layer 0 would turn the
    old layer 1 (experts) into a dense layer at position 0: refused with one line, model untouched.
    Removing layers 0 and 1 keeps the rule true (2 -> dense at 0, 3 -> experts at 1): allowed."""
    monkeypatch.setattr(layer_config, "_sparse_rule", lambda config, num: None)
    model = build_family("qwen2_moe", vocab)
    with pytest.raises(LayerRemovalError, match=r"cannot remove layers \[0\] of this qwen2_moe model") as info:
        remove_layers(model, [0])
    assert "\n" not in str(info.value)
    assert len(decoder(model).layers) == model.config.num_hidden_layers == 4
    check_removal(model.config, [2, 3])


def test_moe_merge_touches_only_corresponding_linears(vocab):
    """GLM-4-MoE, layer 3 (experts + shared experts) merged into layer 2 (the same): attention and shared
    experts follow Eq. 5 exactly; routed experts, router and norms of layer 2 stay as they were. A dense
    layer merged into an MoE layer merges its attention only."""
    model = build_family("glm4_moe", vocab)
    prefix = layers_prefix(model)
    steps = random_lora_grads(model, rank=4, steps=3)
    accumulator = IGIAAccumulator()
    for grads in steps:
        accumulator.update(grads)
    ref_f = reference.igia(steps)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = GradPruneConfig(prune_layers=1, merge_layers=1, score="squared", benchmark=False)
    plan = plan_removal(4, [3], 1, [0.0] * 4)  # layer 3 (MoE) -> 2 (MoE); layers 0, 1 are dense
    fractions = merge_removed_layers(model, plan, lambda n: accumulator.igia(n) if n in ref_f else None, config)
    assert set(fractions[3]) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                 "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj",
                                 "mlp.shared_experts.down_proj"}  # fmt: skip
    for name, param in model.named_parameters():
        if not name.startswith(f"{prefix}2."):
            assert torch.equal(param, before[name]), name
        elif name.endswith(".weight") and name[: -len(".weight")].removeprefix(f"{prefix}2.") in fractions[3]:
            suffix = name[len(f"{prefix}2.") : -len(".weight")]
            source = (before[f"{prefix}3.{suffix}.weight"], ref_f[f"{prefix}3.{suffix}"])
            expected = reference.merge(before[name], [source], 0.2, "add")
            torch.testing.assert_close(param.double(), expected, rtol=1e-6, atol=1e-6)
            assert not torch.equal(param, before[name])
        else:  # routed experts, router, norms
            assert torch.equal(param, before[name]), name
    dense_into_moe = plan_removal(4, [2], 1, [0.0] * 4)  # layer 2 (MoE) -> 1 (dense): attention only
    shares = merge_removed_layers(model, dense_into_moe, lambda n: accumulator.igia(n) if n in ref_f else None,
                                  config)  # fmt: skip
    assert set(shares[2]) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}


def test_merge_priority_counts_what_would_merge(vocab):
    model = build_family("glm4_moe", vocab)
    prefix = layers_prefix(model)
    scores = {f"{prefix}{j}.{n}": 1.0 for j in range(4) for n, m in decoder(model).layers[j].named_modules()
              if isinstance(m, nn.Linear)}  # fmt: skip
    scores[f"{prefix}3.mlp.experts.gate_up_proj.0"] = 100.0  # a routed expert: never merged, never counted
    # Layers 0, 1 dense, 2, 3 MoE with shared experts. 0 has nothing before it; 3 -> 2: attention + shared experts.
    assert merge_priority(model, scores, [0, 3]) == [0.0, 0.0, 0.0, 7.0]
    assert merge_priority(model, scores, [2]) == [0.0, 0.0, 4.0, 0.0]  # MoE -> dense: attention only


def test_igia_ranking_refused_over_layers_with_partial_lora(vocab):
    """Mixtral under swift's all-linear: LoRA on attention only, routed experts without any: an IGIA ranking
    would compare partial sums, so it is refused with one line; a gradient-free criterion is not."""
    model = build_family("mixtral", vocab)
    attention_only = [{n: g for n, g in step.items() if ".self_attn." in n} for step in random_lora_grads(model)]
    accumulator = IGIAAccumulator()
    for grads in attention_only:
        accumulator.update(grads)
    assert set(uncovered(model, accumulator.linear_names)[0]) == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
    with pytest.raises(GradPruneConfigError, match="ranks layers by their IGIA sums") as info:
        prune_model(model, accumulator, GradPruneConfig(prune_layers=1, merge_layers=0, score="squared",
                                                        benchmark=False))  # fmt: skip
    assert "layer 0: mlp.experts.gate_up_proj" in str(info.value) and "\n" not in str(info.value)
    result = prune_model(model, accumulator, GradPruneConfig(prune_layers=1, merge_layers=0, score="last",
                                                             benchmark=False))  # fmt: skip
    assert result.plan.removed == (2,)


def test_fused_expert_lora_is_captured_per_expert(vocab):
    """peft 0.20 moves Qwen3-MoE's MLP targets onto the fused experts (ParamWrapper). Each expert's update is
    B_e A_e in peft's layout; capture names it <param>.<e>, and with every layer MoE the coverage is complete,
    while dense layers next to MoE layers (their MLP left without LoRA by that move) are not comparable."""
    from peft import LoraConfig, get_peft_model

    from swift_gradpruner.capture import lora_pairs, read_lora_grads

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = build_family("qwen3_moe", vocab, mlp_only_layers=[])
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=targets, lora_dropout=0.0))
    pairs = lora_pairs(peft_model)
    fused = [p for p in pairs if p.experts > 1]
    assert {p.name for p in fused} == {f"model.layers.{j}.mlp.experts.{w}" for j in range(4)
                                       for w in ("gate_up_proj", "down_proj")}  # fmt: skip
    wrapper = next(m for n, m in peft_model.named_modules() if hasattr(m, "parameter_name") and
                   n.endswith("layers.0.mlp.experts.base_layer"))  # fmt: skip
    with torch.no_grad():
        for p in (wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight):
            p.normal_()
    for p in (wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight):
        p.grad = p.detach().clone()  # "gradients" equal to the factors: B_e A_e must rebuild peft's delta
    grads = read_lora_grads([p for p in pairs if p.lora_a is wrapper.lora_A["default"].weight])
    delta = wrapper.get_delta_weight("default") / wrapper.scaling["default"]
    for e in range(4):
        grad_a, grad_b = grads[f"model.layers.0.mlp.experts.{wrapper.parameter_name}.{e}"]
        product = grad_b @ grad_a
        assert torch.allclose(product, delta[e]) or torch.allclose(product.T, delta[e])
    names = [p.name for p in pairs]
    assert incomplete_layers(model, names) is None
    mixed = build_family("qwen3_moe", vocab)  # layers 0 and 2 dense
    mixed_pairs = lora_pairs(get_peft_model(mixed, LoraConfig(r=2, target_modules=targets, lora_dropout=0.0)))
    assert "layer 0: mlp.gate_proj" in incomplete_layers(mixed, [p.name for p in mixed_pairs])


def test_preflight_knows_what_phase_1_lora_will_wrap(tmp_path):
    """Qwen3-MoE under swift's all-linear: peft wraps the fused experts (ParamWrapper). A LoRA run with
    swift's default dropout is refused before loading; with --lora_dropout 0 it passes, but an IGIA ranking
    is refused (dense layers' MLP left without LoRA); a full run's phase 1 gets dropout 0 by itself."""
    from swift_gradpruner.swift.phases import phase1_argv
    from swift_gradpruner.swift.preflight import parse_sft_args, preflight

    base, data = create_family(tmp_path, "qwen3_moe", rows=8)
    argv = ["--model", str(base), "--model_type", "qwen3_moe", "--template", "qwen3", "--dataset", str(data),
            "--output_dir", str(tmp_path / "out"), "--check_model", "false", "--max_steps", "4"]  # fmt: skip
    free = GradPruneConfig(prune_layers=1, score="block_influence")
    with pytest.raises(GradPruneConfigError, match="ParamWrapper refuses dropout .* pass --lora_dropout 0"):
        preflight(parse_sft_args([*argv, "--tuner_type", "lora"]), free)
    lora = parse_sft_args([*argv, "--tuner_type", "lora", "--lora_dropout", "0"])
    assert preflight(lora, free).wraps_parameters is True
    with pytest.raises(GradPruneConfigError, match=r"ranks layers by their IGIA sums .*\(layer 0: mlp.gate_proj"):
        preflight(lora, GradPruneConfig(prune_layers=1, score="squared"))
    full_argv = [*argv, "--tuner_type", "full"]
    full = parse_sft_args(full_argv)
    assert preflight(full, free).wraps_parameters is True
    phase1 = phase1_argv(full_argv, full, free, tmp_path / "phase1", zero_dropout=True)
    assert phase1[phase1.index("--lora_dropout") + 1] == "0"


@pytest.mark.parametrize("model_type", ["gemma3", "qwen3_next"])
def test_report_and_timing_of_vision_language_and_hybrid_moe(model_type, vocab):
    """The per-run report on a vision-language and a hybrid MoE model records vLLM-on-CPU's known refusal,
    and the dense-vs-pruned timing runs on them (vocabulary and heads read from the decoder's config)."""
    from swift_gradpruner.prune import time_dense_vs_pruned
    from swift_gradpruner.surgery import Snapshot

    model = build_family(model_type, vocab)
    result = prune_model(model, None, GradPruneConfig(prune_layers=1, merge_layers=0, score="last", benchmark=False))
    report = result.report
    assert (report["num_layers_before"], report["num_layers_after"], report["dropped_layers"]) == (4, 3, [2])
    assert f"does not serve {model_type}" in report["vllm_cpu_unsupported"]
    model = build_family(model_type, vocab)
    dense = Snapshot(model)
    remove_layers(model, [2])
    timing = time_dense_vs_pruned(model, dense, rounds=1)
    assert set(timing["workloads"]) == {"decode", "prefill"} and len(decoder(model).layers) == 3


def test_gpt_oss_pruned_off_its_layer_parity_is_flagged_for_vllm(vocab):
    """vLLM's gpt-oss slides on even layers whatever layer_types say (tests/test_families_swift.py shows it
    serving another model then); the report's vllm_unsupported says so for such a prune, not otherwise."""
    from swift_gradpruner.serving import vllm_refusal

    kept_parity, broken = build_family("gpt_oss", vocab), build_family("gpt_oss", vocab)
    remove_layers(kept_parity, [3])
    remove_layers(broken, [1])
    assert vllm_refusal(kept_parity.config) is None
    assert "ignores layer_types" in vllm_refusal(broken.config)
