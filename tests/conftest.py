import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# pytest-xdist workers share the cores: each worker's torch, and the swift processes it starts (they inherit
# OMP_NUM_THREADS), take their share instead of all of them (oversubscribed OpenMP threads spin and stall).
THREADS = max(1, min(2, os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def tokenizer():
    from swift_gradpruner.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    """A saved 5-layer tiny Llama with the session's tokenizer (the evaluation harness's tests)."""
    from swift_gradpruner.tiny import build_model

    path = tmp_path_factory.mktemp("tiny") / "model"
    build_model("llama", num_layers=5, vocab_size=len(tokenizer), seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def random_lora_grads(model, rank=4, steps=3, seed=0, scale=1e-3):
    """Per-step random (gA, gB) for every linear in the decoder layers, named as in the base model."""
    gen = torch.Generator().manual_seed(seed)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    out = []
    for _ in range(steps):
        out.append(
            {
                name: (
                    torch.randn(rank, m.in_features, generator=gen) * scale,
                    torch.randn(m.out_features, rank, generator=gen) * scale,
                )
                for name, m in linears
            }
        )
    return out


def tensors_of(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint (one file or shards), by key."""
    from safetensors import safe_open

    from swift_gradpruner.streaming import weight_files

    out = {}
    for key, path in weight_files(folder).items():
        with safe_open(path, framework="pt") as f:
            out[key] = f.get_tensor(key)
    return out


HEAVY_FIRST = ("test_swift_deepspeed", "test_swift_e2e", "test_demo", "test_multinode", "test_families_swift",
               "test_vllm_serving", "test_multirank", "test_hub", "test_models", "test_bench")  # fmt: skip
"""The longest test files (minutes each: swift sft, DeepSpeed, vLLM; slowest first as measured in a fresh clone,
test_swift_deepspeed with DeepSpeed's JIT builds), started first, so that the two pytest workers do not end with
one of them running a long file alone. scripts/test.sh passes --no-loadscope-reorder: xdist's own order would
put the files with the most tests first (test_demo, one test, went last)."""


def pytest_collection_modifyitems(items) -> None:
    order = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: order.get(Path(item.nodeid.split("::")[0]).stem, len(order)))
