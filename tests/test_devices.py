"""Where the prune step runs (devices.py), and the prune step on a model that accelerate dispatched
with a device_map: criterion, guard, merge, surgery, timing and save as on a plain model."""

import json

import pytest
import torch
from safetensors import safe_open

from conftest import random_lora_grads
from swift_gradpruner import checkpoint
from swift_gradpruner.config import GradPruneConfig
from swift_gradpruner.devices import CPU, RESERVE_BYTES, RESERVE_FRACTION, DevicePlan, plan_after_oom, plan_devices
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


# -- after an out-of-memory error: one GPU -> the node's GPUs -> the CPU (issue 33 item 2) --------------------


def test_after_one_gpu_runs_out_the_nodes_gpus_are_tried():
    """A 60 GiB model fits one 79 GiB card, but its activations did not: four such cards share it next."""
    one = DevicePlan(gpus=(0,))
    free = {gpu: 79 * GIB for gpu in range(4)}
    following = plan_after_oom(one, free, 60 * GIB, 32)
    assert following.gpus == (0, 1, 2, 3) and following.device_map == "auto"
    assert following.max_memory == dict.fromkeys(range(4), int(79 * GIB * 0.95) - RESERVE_BYTES)
    assert plan_after_oom(following, free, 60 * GIB, 32) == DevicePlan(
        reason="the GPUs of the device_map ran out of memory"
    )  # after several GPUs, the CPU


def test_after_one_gpu_runs_out_without_room_elsewhere_the_cpu():
    one = DevicePlan(gpus=(1,))
    alone = plan_after_oom(one, {1: 79 * GIB}, 60 * GIB, 32)
    assert alone.gpus == () and alone.describe() == "the CPU (no other GPU to spread the model over)"
    busy = plan_after_oom(one, {1: 79 * GIB, 0: 3 * GIB, 2: 6 * GIB}, 60 * GIB, 32)  # the others are busy
    assert busy.gpus == () and busy.reason == "the model's 60.0 GiB do not fit the 3 GPUs together: 88.0 GiB free"
    # 70 GiB free hold 60 GiB only without the reserve and a layer's margin on each: still the CPU
    assert plan_after_oom(one, {1: 40 * GIB, 0: 30 * GIB}, 60 * GIB, 32).gpus == ()
    assert plan_after_oom(one, {1: 40 * GIB, 0: 40 * GIB}, 60 * GIB, 32).gpus == (0, 1)


def test_an_out_of_memory_on_the_cpu_plan_stays_on_the_cpu():
    assert plan_after_oom(CPU, {0: 80 * GIB}, GIB, 8) == CPU


def batches(vocab: int) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(3, vocab, (4, 12), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}]


def test_the_prune_step_goes_from_one_gpu_to_several_to_the_cpu(tmp_path, monkeypatch):
    """On a CPU-only machine, torch.cuda faked as two 40 GiB GPUs: the tiny model goes to cuda:0, runs out of
    memory there, then on a device_map over both, and is pruned on the CPU; each attempt gets the same
    criterion cache, and garbage is collected before each handing back of the CUDA cache."""
    import gc

    tokenizer = build_tokenizer()
    build_model("llama", num_layers=4, vocab_size=len(tokenizer)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    asked = fake_gpus(monkeypatch, {0: 40 * GIB, 1: 40 * GIB})
    events: list[str] = []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *args: events.append("gc") or real_collect(*args))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append("empty_cache"))
    real_load, real_prune = checkpoint._load, checkpoint.prune_model
    plans, devices, caches = [], [], []

    def load(model_dir, plan):
        plans.append(plan)
        return real_load(model_dir, CPU)  # the weights stay on the CPU: there is no GPU here

    def prune_model(model, *args, device, criterion_cache, **kwargs):
        devices.append(device)
        caches.append(criterion_cache)
        if device != "cpu":
            raise torch.OutOfMemoryError(f"CUDA out of memory on {device}")
        return real_prune(model, *args, device=device, criterion_cache=criterion_cache, **kwargs)

    monkeypatch.setattr(checkpoint, "_load", load)
    monkeypatch.setattr(checkpoint, "prune_model", prune_model)
    lines: list[str] = []
    config = GradPruneConfig(prune_layers=1, score="block_influence", benchmark=False)
    result = checkpoint.prune_checkpoint(tmp_path / "base", None, config, tmp_path / "out", {}, {},
                                         calibration=batches(len(tokenizer)), log=lines.append,
                                         warn=lines.append)  # fmt: skip
    assert [plan.gpus for plan in plans] == [(0,), (0, 1), ()] and devices == ["cuda:0", "cuda:0", "cpu"]
    assert all(cache is caches[0] for cache in caches)
    assert asked == [0, 0, 1]  # rank 0's GPU for the plan, then every GPU after the first failure
    warned = [line for line in lines if "out of GPU memory" in line]
    assert len(warned) == 2
    assert warned[0].endswith("doing the prune step again on cuda:0-1 (device_map over 2 GPUs)")
    assert "while pruning on cuda:0-1" in warned[1]
    assert warned[1].endswith("again on the CPU (the GPUs of the device_map ran out of memory) (slower)")
    assert events[:4] == ["gc", "empty_cache", "gc", "empty_cache"]
    assert len(result.plan.removed) == 1 and (tmp_path / "out" / "config.json").is_file()


# -- a GPU that cannot be asked (exclusive-process mode, another process holds it) ------------------------------


BUSY = torch.AcceleratorError("CUDA error: all CUDA-capable devices are busy or unavailable")


def test_a_gpu_that_cannot_be_asked_ends_the_asking(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_sizing", lambda model_dir: (100 * GIB, 80))
    asked = fake_gpus(monkeypatch, {0: 79 * GIB, 1: 79 * GIB, 2: BUSY, 3: 79 * GIB})
    plan = checkpoint._device_plan(tmp_path)
    assert plan.gpus == (0, 1) and asked == [0, 1, 2]  # planned with what was read; cuda:3 not asked
    monkeypatch.setattr(checkpoint, "_sizing", lambda model_dir: (200 * GIB, 80))
    plan = checkpoint._device_plan(tmp_path)
    assert plan.gpus == ()
    assert plan.reason == (
        "the model's 200.0 GiB do not fit the 2 GPU(s): 158.0 GiB free; cuda:2 could not be asked for its free "
        "memory (CUDA error: all CUDA-capable devices are busy or unavailable)"
    )


def test_when_rank_0s_gpu_cannot_be_asked_the_plan_is_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_sizing", lambda model_dir: (GIB, 8))
    asked = fake_gpus(monkeypatch, {0: 79 * GIB, 1: BUSY}, current=1)
    plan = checkpoint._device_plan(tmp_path)
    assert plan.gpus == () and asked == [1]
    assert plan.describe() == ("the CPU (cuda:1 could not be asked for its free memory (CUDA error: all "
                               "CUDA-capable devices are busy or unavailable))")  # fmt: skip

    def no_device():
        raise RuntimeError("CUDA error: no CUDA-capable device is detected")

    monkeypatch.setattr(torch.cuda, "current_device", no_device)
    assert checkpoint._device_plan(tmp_path).reason.startswith("the current GPU could not be asked")


def test_after_an_out_of_memory_a_gpu_that_cannot_be_asked_is_left_out(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_sizing", lambda model_dir: (60 * GIB, 32))
    fake_gpus(monkeypatch, {0: 79 * GIB, 1: 79 * GIB, 2: BUSY, 3: 79 * GIB})
    assert checkpoint._plan_after_oom(tmp_path, DevicePlan(gpus=(0,))).gpus == (0, 1)
    fake_gpus(monkeypatch, {0: 79 * GIB, 1: BUSY})
    following = checkpoint._plan_after_oom(tmp_path, DevicePlan(gpus=(0,)))
    assert following.gpus == () and following.reason.startswith(
        "no other GPU to spread the model over; cuda:1 could not be asked"
    )


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
