"""Where the prune step runs (devices.py), and the prune step on a model that accelerate dispatched
with a device_map: criterion, guard, merge, surgery, timing and save as on a plain model."""

import json

import pytest
import torch
from safetensors import safe_open

from conftest import random_lora_grads
from swift_gradpruner import checkpoint
from swift_gradpruner.config import GradPruneConfig
from swift_gradpruner.devices import RESERVE_BYTES, RESERVE_FRACTION, plan_devices
from swift_gradpruner.importance import IGIAAccumulator
from swift_gradpruner.streaming import weight_files
from swift_gradpruner.tiny import build_model, build_tokenizer
from swift_gradpruner.weight_files import loaded_weight_bytes

GIB = 2**30


def test_no_gpu_means_the_cpu():
    plan = plan_devices({}, 10 * GIB, 32)
    assert (plan.gpus, plan.device, plan.device_map, plan.describe()) == ((), "cpu", {"": "cpu"}, "the CPU")


def test_a_model_that_fits_rank_0s_gpu_stays_on_it():
    plan = plan_devices({3: 80 * GIB, 0: 80 * GIB}, 16 * GIB, 32)  # an 8B model in bf16; rank 0 is on GPU 3
    assert (plan.gpus, plan.device, plan.device_map) == ((3,), "cuda:3", {"": "cuda:3"})
    assert plan.describe() == "cuda:3 (one GPU)" and not plan.max_memory


def test_a_70b_model_is_spread_over_the_nodes_gpus():
    """140 GB of bf16 weights, 80 layers, eight 80 GB cards with 79 GB free each."""
    free = {gpu: 79 * GIB for gpu in range(8)}
    plan = plan_devices(free, 140 * GIB, 80)
    assert plan.gpus == tuple(range(8)) and plan.device == "cuda:0" and plan.device_map == "auto"
    assert plan.describe() == "cuda:0-7 (device_map over 8 GPUs)"
    room = int(79 * GIB * 0.95) - RESERVE_BYTES
    assert plan.max_memory == dict.fromkeys(range(8), room)  # what the load may put on each GPU


def test_busy_gpus_are_left_out_and_the_rest_must_hold_the_model():
    free = {0: 79 * GIB, 1: 2 * GIB, 2: 79 * GIB}  # GPU 1 is busy
    plan = plan_devices(free, 120 * GIB, 80)
    assert plan.gpus == (0, 2) and plan.describe() == "cuda:0,2 (device_map over 2 GPUs)"
    assert set(plan.max_memory) == {0, 2}
    # 2 x (79 * 0.95 - 4) = 142 GiB of room, less one 2 x 1.75 GiB block each: 135 GiB hold 120, not 140.
    too_big = plan_devices(free, 140 * GIB, 80)
    assert too_big.gpus == () and too_big.device == "cpu"
    assert too_big.describe() == "the CPU (the model's 140.0 GiB do not fit the 3 GPU(s): 160.0 GiB free)"
    assert plan_devices({0: 24 * GIB}, 30 * GIB, 32).gpus == ()  # one small GPU: the CPU


def fake_gpus(monkeypatch, free: dict, current: int = 0) -> list[int]:
    """torch.cuda as a node whose GPUs have ``free`` bytes free (an exception: what asking that GPU raises),
    on a CPU-only machine. Returns the GPUs asked, in order."""
    asked: list[int] = []

    def mem_get_info(gpu):
        asked.append(gpu)
        if isinstance(free[gpu], BaseException):
            raise free[gpu]
        return free[gpu], 80 * GIB

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(free))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    return asked


def free_for_room(room: int) -> int:
    """The free bytes that leave ``room`` bytes for weights after the reserve."""
    return -(-(room + RESERVE_BYTES) // (1 - RESERVE_FRACTION)) + 1


def test_the_plan_sizes_the_model_by_the_files_from_pretrained_loads(tmp_path, monkeypatch):
    """Issue 33 item 1: a .bin beside the safetensors, Mistral's consolidated.safetensors and a trainer's
    optimizer.pt once counted with the weights (three to four times the model): here the GPU holds the model
    once with half of it to spare, so the model stays on it."""
    import shutil

    folder = tmp_path / "model"
    model = build_model("llama", num_layers=4, vocab_size=64)
    model.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    shutil.copy(folder / "model.safetensors", folder / "consolidated.safetensors")
    torch.save({"state": model.state_dict(), "again": model.state_dict()}, folder / "optimizer.pt")
    size = loaded_weight_bytes(folder)
    every_file = sum(path.stat().st_size for path in folder.iterdir() if path.suffix in (".safetensors", ".bin", ".pt"))
    assert every_file > 4 * size
    asked = fake_gpus(monkeypatch, {0: free_for_room(size + size // 2), 1: 80 * GIB})
    plan = checkpoint._device_plan(folder)
    assert plan.gpus == (0,) and asked == [0]  # one GPU; the other was not asked


def _dispatched(load):
    """``checkpoint._load`` followed by accelerate's dispatch with a hook on every layer (all on the CPU,
    the one device here; on GPUs transformers' from_pretrained(device_map=...) attaches the same hooks)."""
    from accelerate import dispatch_model

    models = []

    def loader(model_dir, plan):
        model = load(model_dir, plan)
        parts = {f"model.{name}": "cpu" for name, _ in model.model.named_children() if name != "layers"}
        layers = {f"model.layers.{j}": "cpu" for j in range(len(model.model.layers))}
        dispatch_model(model, {**parts, **layers, "lm_head": "cpu"}, force_hooks=True)
        models.append(model)
        return model

    return loader, models


@pytest.mark.parametrize("score,merge", [("block_influence", 0), ("squared", 1)])
def test_prune_step_on_a_dispatched_model_writes_the_same_checkpoint(tmp_path, monkeypatch, score, merge):
    """The default path (Block Influence, guard, timing) and a paper-method one (IGIA, one merge): a model
    with accelerate's hooks on every layer is pruned, guarded, timed and saved as the plain model is."""
    tokenizer = build_tokenizer()
    base = build_model("llama", num_layers=6, vocab_size=len(tokenizer), seed=2)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    accumulator = IGIAAccumulator()
    for grads in random_lora_grads(base, steps=3):
        accumulator.update(grads)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tokenizer), (4, 16), generator=gen)
    rows = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}]
    timed = score == "block_influence"  # the default path times dense vs pruned (slow on a CPU: once)
    config = GradPruneConfig(prune_layers=2, merge_layers=merge, score=score, benchmark=timed)

    def run(name, lines):
        return checkpoint.prune_checkpoint(
            tmp_path / "base", accumulator, config, tmp_path / name, {}, {}, guard=rows, calibration=rows,
            log=lines.append, warn=lines.append,
        )  # fmt: skip

    plain = run("plain", [])
    loader, models = _dispatched(checkpoint._load)
    monkeypatch.setattr(checkpoint, "_load", loader)
    lines = []
    hooked = run("hooked", lines)
    assert len(models) == 1 and hasattr(models[0].model.layers[0], "_hf_hook")  # the hooks were there
    assert "[GradPruner] prune step on the CPU" in lines
    assert hooked.plan == plain.plan and len(hooked.plan.removed) == 2 and len(hooked.plan.merged) == merge
    assert hooked.report["quality_guard"]["kls"] == plain.report["quality_guard"]["kls"]
    assert hooked.report["quality_guard"]["kl"] > 0
    assert hooked.report["criterion"] == plain.report["criterion"]
    assert ("workloads" in hooked.report.get("inference_benchmark", {})) == timed  # timed through the hooks
    files = weight_files(tmp_path / "plain")
    assert files.keys() == weight_files(tmp_path / "hooked").keys() and "model.layers.3.mlp.up_proj.weight" in files
    assert "model.layers.4.mlp.up_proj.weight" not in files
    for key, path in files.items():
        with safe_open(path, "pt") as a, safe_open(weight_files(tmp_path / "hooked")[key], "pt") as b:
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hooked").eval()
    assert reloaded.config.num_hidden_layers == 4
    assert json.loads((tmp_path / "hooked" / "config.json").read_text())["num_hidden_layers"] == 4
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=0)
