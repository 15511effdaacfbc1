"""Tiny local models, tokenizer and dataset for the offline demo, tests and benchmarks (no downloads).

The tokenizer is a byte-level BPE trained on the generated dataset itself; the models are random
Llama / Mistral / Qwen2 / Qwen3 configs of a few layers; the dataset is a chat-format JSONL of
small arithmetic and word questions, easy enough that a few hundred steps visibly lower the loss.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "lemon",
    "candle",
    "garden",
    "rocket",
    "violin",
    "forest",
    "planet",
]


def llama_linear_shapes(hidden: int, kv: int, ffn: int) -> dict[str, tuple[int, int]]:
    """(out, in) shape of each linear of a Llama-style decoder layer (``kv`` = k/v output size, GQA)."""
    return {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (ffn, hidden),
        "mlp.up_proj": (ffn, hidden),
        "mlp.down_proj": (hidden, ffn),
    }


def chat_rows(count: int, seed: int = 0) -> list[dict]:
    """``count`` deterministic chat examples in ms-swift's messages format."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        kind = rng.randrange(3)
        if kind == 0:
            a, b = rng.randrange(50), rng.randrange(50)
            question, answer = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        elif kind == 1:
            word = rng.choice(WORDS)
            question, answer = f"Spell the word {word} backwards.", f"{word} backwards is {word[::-1]}."
        else:
            a, b = rng.randrange(20), rng.randrange(20)
            bigger = max(a, b)
            question, answer = f"Which is larger, {a} or {b}?", f"The larger number is {bigger}."
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return rows


def write_dataset(path: str | Path, count: int = 256, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in chat_rows(count, seed):
            f.write(json.dumps(row) + "\n")
    return path


def build_tokenizer(vocab_size: int = 512, extra_special_tokens: list[str] | tuple[str, ...] = ()):
    """A byte-level BPE tokenizer trained on the tiny dataset, with ChatML special tokens (ids 0-2) and
    ``extra_special_tokens`` after them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [m["content"] for row in chat_rows(2000, seed=1) for m in row["messages"]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *extra_special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=CHATML_TEMPLATE,
    )


def build_model(
    arch: str = "llama",
    num_layers: int = 6,
    vocab_size: int = 512,
    *,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    seed: int = 0,
    **config_kw,
):
    """A random causal LM of the given architecture (GQA: ``kv_heads`` < ``heads``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    config_kw.setdefault("tie_word_embeddings", False)
    config = AutoConfig.for_model(
        arch,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=0,
        **config_kw,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model


def create_tiny(
    out_dir: str | Path,
    arch: str = "llama",
    num_layers: int = 6,
    rows: int = 256,
    seed: int = 0,
    pretrain_steps: int = 0,
) -> tuple[Path, Path]:
    """Save a tiny model + tokenizer to ``out_dir/model`` and a dataset to ``out_dir/train.jsonl``.

    ``pretrain_steps`` > 0 first trains the random model on its own task (see ``pretrain``).
    """
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    model = build_model(arch, num_layers, vocab_size=len(tokenizer), seed=seed)
    if pretrain_steps:
        pretrain(model, tokenizer, steps=pretrain_steps, seed=seed)
    model_dir = out_dir / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, write_dataset(out_dir / "train.jsonl", rows, seed)


def pretrain(model, tokenizer, steps: int = 300, batch: int = 16, lr: float = 3e-3, seed: int = 0):
    """Full-parameter training of a tiny model on its chat data, so that it is a 'pretrained' model
    whose layers already do something (a random network's gradients say little about a real one)."""
    import torch

    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in chat_rows(4000, seed + 7)]
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        picks = torch.randint(len(texts), (batch,), generator=gen).tolist()
        inputs = tokenizer([texts[i] for i in picks], return_tensors="pt", padding=True)
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval()
    return loss.item()
