"""Tiny random models of every supported family, with each family's real per-layer config keys.

Sizes are the smallest that exercise what pruning must keep consistent: 4 decoder layers, hidden 64
(head_dim 16; ``head_dim=64`` gives hidden 128 for vLLM, whose CPU attention needs it), 4 experts, and
per-layer patterns that a naive layer removal would break (sliding/full attention, linear/full
attention, dense/MoE layers by ``decoder_sparse_step``, ``mlp_only_layers``, ``first_k_dense_replace``).
"""

from __future__ import annotations

from pathlib import Path

from .tiny import CHATML_TEMPLATE, build_tokenizer, write_dataset

_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
_LINEAR_ATTENTION = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                         linear_value_head_dim=16, linear_conv_kernel_dim=4)  # fmt: skip
FAMILY_CONFIG: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma2": dict(sliding_window=8, query_pre_attn_scalar=16, tie_word_embeddings=True),
    "gemma3_text": dict(sliding_window=8, sliding_window_pattern=2, query_pre_attn_scalar=16, tie_word_embeddings=True),
    "phi3": {},
    "glm4": {},
    "qwen3_5_text": dict(full_attention_interval=2, **_LINEAR_ATTENTION),
    "qwen3_next": dict(
        full_attention_interval=2,
        num_experts=4,
        shared_expert_intermediate_size=32,
        decoder_sparse_step=2,
        **_MOE,
        **_LINEAR_ATTENTION,
    ),
    "qwen2_moe": dict(num_experts=4, shared_expert_intermediate_size=32, decoder_sparse_step=2, **_MOE),
    "qwen3_moe": dict(num_experts=4, mlp_only_layers=[0, 2], **_MOE),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "glm4_moe": dict(n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=2, n_group=1, topk_group=1, **_MOE),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=8),
    "deepseek_v3": dict(
        n_routed_experts=4,
        n_shared_experts=1,
        first_k_dense_replace=2,
        n_group=1,
        topk_group=1,
        q_lora_rank=32,
        # vLLM's CPU MLA kernel only compiles for a latent cache of kv_lora_rank + rope = 512 + 64 (DeepSeek-V3's).
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=16,
        v_head_dim=16,
        head_dim=64,
        topk_method="noaux_tc",  # as in DeepSeek-V3's config.json (vLLM reads it; transformers always does this)
        scoring_func="sigmoid",
        **_MOE,
    ),
}
"""Config keyword arguments per ``model_type`` on top of the common tiny sizes."""
FAMILY_SPECIAL_TOKENS = [
    "<bos>", "<start_of_turn>", "<end_of_turn>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "[gMASK]",
    "<sop>", "<|start|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>", "<|vision_start|>",
    "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<think>", "</think>", "<|begin_of_sentence|>",
    "<|observation|>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
    "<start_of_image>", "<end_of_image>", "<image_soft_token>",
]  # fmt: skip
IMAGE_TOKEN = "<image_soft_token>"
"""Special tokens the families' swift templates write, so that each is one token in the tiny tokenizer."""


def build_family_tokenizer():
    """The tiny BPE tokenizer (ChatML) with the special tokens of every family's template added (and the
    image tokens Gemma 3's processor looks up by name)."""
    tokenizer = build_tokenizer(extra_special_tokens=FAMILY_SPECIAL_TOKENS)
    # Named model-specific tokens, saved in tokenizer_config.json (transformers 5: "extra_special_tokens").
    tokenizer._set_model_specific_special_tokens(
        {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": IMAGE_TOKEN}
    )
    return tokenizer


def family_config(model_type: str, vocab_size: int, num_layers: int = 4, head_dim: int = 16, **overrides):
    """A tiny config of ``model_type`` (a vision-language type gets a tiny vision tower too)."""
    from transformers import AutoConfig

    heads = 4 if head_dim == 16 else 2
    text = dict(vocab_size=vocab_size, hidden_size=heads * head_dim, intermediate_size=2 * heads * head_dim,
                num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                head_dim=head_dim, max_position_embeddings=512, pad_token_id=0, eos_token_id=2, bos_token_id=None,
                tie_word_embeddings=False)  # fmt: skip
    if model_type == "gemma3":  # vision-language: a Gemma 3 text decoder and a SigLIP vision tower
        text.update(FAMILY_CONFIG["gemma3_text"])
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                      patch_size=14)  # fmt: skip
        return AutoConfig.for_model(model_type, text_config={**text, **overrides}, vision_config=vision,
                                    mm_tokens_per_image=4, boi_token_index=_token("<start_of_image>"),
                                    eoi_token_index=_token("<end_of_image>"), image_token_index=_token(IMAGE_TOKEN),
                                    tie_word_embeddings=True)  # fmt: skip
    if model_type == "deepseek_v3":  # multi-head latent attention: as many key/value heads as query heads
        text["num_key_value_heads"] = heads
    return AutoConfig.for_model(model_type, **{**text, **FAMILY_CONFIG[model_type], **overrides})


def _token(token: str) -> int:
    """Id of a family special token in ``build_family_tokenizer`` (added after the 3 ChatML ones)."""
    return 3 + FAMILY_SPECIAL_TOKENS.index(token)


def build_family(model_type: str, vocab_size: int, num_layers: int = 4, head_dim: int = 16, seed: int = 0,
                 **overrides):  # fmt: skip
    """A random float32 model of ``model_type`` (``families.FAMILIES``), in eval mode."""
    import torch

    from .architecture import auto_class

    config = family_config(model_type, vocab_size, num_layers, head_dim, **overrides)
    torch.manual_seed(seed)
    model = auto_class(config)._from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model.eval()


def create_family(out_dir: str | Path, model_type: str, num_layers: int = 4, rows: int = 64, head_dim: int = 16,
                  seed: int = 0) -> tuple[Path, Path]:  # fmt: skip
    """Save a tiny ``model_type`` model with its tokenizer (and processor) to ``out_dir/model`` and a chat
    dataset to ``out_dir/train.jsonl``."""
    out_dir = Path(out_dir)
    tokenizer = build_family_tokenizer()
    model = build_family(model_type, len(tokenizer), num_layers, head_dim, seed)
    model_dir = out_dir / "model"
    model.save_pretrained(model_dir)
    if model_type == "gemma3":
        _save_vl_processor(tokenizer, model_dir)
    else:
        tokenizer.save_pretrained(model_dir)
    return model_dir, write_dataset(out_dir / "train.jsonl", rows, seed)


def _save_vl_processor(tokenizer, model_dir: Path) -> None:
    """A Gemma 3 processor (slow image processor: no torchvision) around the tiny tokenizer."""
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    image_processor = Gemma3ImageProcessor(size={"height": 56, "width": 56})
    Gemma3Processor(image_processor, tokenizer, chat_template=CHATML_TEMPLATE, image_seq_length=4).save_pretrained(
        model_dir
    )
