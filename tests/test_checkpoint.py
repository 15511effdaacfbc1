"""prune_checkpoint (a checkpoint on disk -> a pruned checkpoint on disk): a GPU that runs out of memory
anywhere in the prune step costs one line, and the step is redone on the CPU with the same result."""

import json

import pytest
import torch

from swift_gradpruner import prune as prune_module
from swift_gradpruner import prune_checkpoint  # the package export, wherever it lives
from swift_gradpruner.config import GradPruneConfig
from swift_gradpruner.streaming import weight_files
from swift_gradpruner.tiny import build_model, build_tokenizer


def batches(vocab: int, rows: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, 12), generator=gen)
    labels = ids.clone()
    labels[:, :4] = -100
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}]


def test_out_of_gpu_memory_in_the_criterion_falls_back_to_the_cpu(tmp_path, monkeypatch):
    """Issue 18 item 12: torch.OutOfMemoryError (what CUDA raises) in the first criterion call."""
    tokenizer = build_tokenizer()
    build_model("llama", num_layers=6, vocab_size=len(tokenizer)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    config = GradPruneConfig(prune_layers=2, score="skip_loss", benchmark=False)
    calibration, guard = batches(len(tokenizer)), batches(len(tokenizer), seed=1)

    def run(name: str, lines: list[str]):
        return prune_checkpoint(tmp_path / "base", None, config, tmp_path / name, {}, {"model_type": "llama"},
                                guard=guard, calibration=calibration, log=lines.append, warn=lines.append)  # fmt: skip

    plain = run("plain", [])
    real = prune_module.removed_layers
    calls = []

    def out_of_memory_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(prune_module, "removed_layers", out_of_memory_once)
    lines: list[str] = []
    again = run("again", lines)
    warned = [line for line in lines if "out of GPU memory" in line]
    assert len(warned) == 1 and "doing the prune step again on the CPU" in warned[0] and "\n" not in warned[0]
    assert again.plan == plain.plan and len(calls) >= 2
    saved = json.loads((tmp_path / "again" / "gradprune_report.json").read_text())
    assert saved["dropped_layers"] == plain.report["dropped_layers"]
    from safetensors import safe_open

    for key, path in weight_files(tmp_path / "plain").items():
        with safe_open(path, "pt") as a, safe_open(weight_files(tmp_path / "again")[key], "pt") as b:
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    assert not list(tmp_path.glob(".again*"))  # nothing half-written beside it


def test_out_of_memory_on_the_cpu_retry_is_not_retried_again(tmp_path, monkeypatch):
    """Only one retry: a second OutOfMemoryError propagates (no loop), and nothing is left on disk."""
    model = build_model("llama", num_layers=4, vocab_size=64)
    model.save_pretrained(tmp_path / "base")

    def always(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(prune_module, "removed_layers", always)
    config = GradPruneConfig(prune_layers=1, score="skip_loss", benchmark=False)
    with pytest.raises(torch.OutOfMemoryError):
        prune_checkpoint(tmp_path / "base", None, config, tmp_path / "out", {}, {}, calibration=batches(64),
                         log=lambda line: None, warn=lambda line: None)  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_the_model_that_ran_out_of_memory_is_freed_before_the_cpu_retry(tmp_path, monkeypatch):
    """Issue 25 item 4: the retry once ran inside the ``except`` block, whose traceback kept the GPU model
    (and the guard's dense targets) alive, so emptying the CUDA cache freed nothing. The first model must
    be garbage by the time the second prune starts."""
    import weakref

    from swift_gradpruner import checkpoint

    tokenizer = build_tokenizer()
    build_model("llama", num_layers=4, vocab_size=len(tokenizer)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    real = checkpoint.prune_model
    first: list[weakref.ref] = []

    def out_of_memory_once(model, *args, **kwargs):
        if not first:
            first.append(weakref.ref(model))
            held = [model, torch.zeros(8)]  # a local the traceback keeps, like the guard's dense targets
            raise torch.OutOfMemoryError(f"CUDA out of memory ({len(held)} tensors held)")
        assert first[0]() is None, "the first model is still alive when the CPU retry starts"
        assert model is not None
        return real(model, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "prune_model", out_of_memory_once)
    lines: list[str] = []
    config = GradPruneConfig(prune_layers=1, score="block_influence", benchmark=False)
    result = prune_checkpoint(tmp_path / "base", None, config, tmp_path / "out", {}, {},
                              calibration=batches(len(tokenizer)),
                              log=lines.append, warn=lines.append)  # fmt: skip
    assert len(first) == 1 and first[0]() is None and len(result.plan.removed) == 1
    assert sum("doing the prune step again on the CPU" in line for line in lines) == 1
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3
