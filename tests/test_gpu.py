"""GPU checks, all skipped without CUDA (scripts/gpu_check.sh runs them on a GPU machine).

* the default path (Block Influence, quality guard, surgery, timing; no phase 1) of a real
  ``swift sft --gradprune true`` run on the GPU, against a CPU recomputation, then phase 2 on the pruned model;
* the prune step in-process: bfloat16 on rank 0's GPU, a real out-of-memory retry that frees the GPU,
  and (2+ GPUs) a model spread over two GPUs by a device_map, equal to the CPU's result;
* the paper's method (IGIA + one merge) in float16, plain and ZeRO-3: the loss scale is removed;
* GPU memory handed back between the phases; IGIA rebuild and merge on CUDA; gradients on several devices.
"""

import json

import pytest
import torch

import reference
from swift_gradpruner import checkpoint
from swift_gradpruner.config import GradPruneConfig
from swift_gradpruner.devices import CPU
from swift_gradpruner.importance import IGIAAccumulator
from swift_gradpruner.merge import merge_linear

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible to torch"),
]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more CUDA GPUs")


def _rows(vocab: int, count: int = 4, width: int = 24, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (count, width), generator=gen)
    labels = ids.clone()
    labels[:, : width // 2] = -100
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}]


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A tiny random Llama (6 layers) with its tokenizer, saved in float32; and calibration/guard rows."""
    from swift_gradpruner.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    model_dir = tmp_path / "base"
    build_model("llama", num_layers=6, vocab_size=len(tokenizer), seed=2).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, _rows(len(tokenizer)), _rows(len(tokenizer), seed=1)


def _settled_cuda_memory() -> int:
    """Bytes allocated on the GPU once cuBLAS has made its workspaces (they stay for the process)."""
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        ones = torch.ones(64, 64, device="cuda", dtype=dtype)
        (ones @ ones).sum().item()
    del ones
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def _prune(model_dir, out, config, calibration, guard, lines=None):
    lines = [] if lines is None else lines
    return checkpoint.prune_checkpoint(model_dir, None, config, out, {}, {"model_type": "llama"}, guard=guard,
                                       calibration=calibration, log=lines.append, warn=lines.append)  # fmt: skip


# -- the default path through swift ------------------------------------------------------------------------


def test_default_swift_run_prunes_on_the_gpu_as_the_cpu_would(tmp_path):
    """``swift sft --gradprune true`` with the defaults (Block Influence, guard, timing; no phase 1): the
    criterion and the guard ran on cuda:0 and agree with a CPU float32 recomputation from the run's own saved
    rows (1e-4: PyTorch leaves TF32 off for float32 matmuls, so CUDA and CPU differ by rounding order only);
    the pruned checkpoint is the base without the chosen layers; phase 2 trains it."""
    from transformers import AutoModelForCausalLM

    from swift_gradpruner import criteria
    from swift_gradpruner.swift.holdout import BATCHES_FILE, load_batches
    from swift_gradpruner.tiny import create_tiny
    from swift_run import COMMON, check, logged_losses, report_of, run_dir, swift

    model_dir, data = create_tiny(tmp_path / "tiny", "llama", num_layers=6, rows=256)
    out = tmp_path / "out"
    proc = check(swift(
        "sft", "--model", str(model_dir), "--model_type", "llama", "--dataset", str(data), *COMMON,
        "--tuner_type", "lora", "--max_steps", "6", "--save_steps", "6", "--per_device_train_batch_size", "4",
        "--gradient_accumulation_steps", "1", "--output_dir", str(out), "--gradprune", "true",
        "--gradprune_prune_layers", "2", cwd=tmp_path, env={"NPROC_PER_NODE": "1"},
    ))  # fmt: skip
    assert "[GradPruner] no phase 1" in proc.output and "[GradPruner] prune step on cuda:0 (one GPU)" in proc.output
    run = run_dir(out)
    report = report_of(out)
    pruned = run / "gradprune" / "model"
    assert report["criterion"]["name"] == "block_influence" and report["num_layers_after"] == 4
    assert set(report["stage_seconds"]) >= {"load", "choice", "surgery", "timing"}
    timing = report["inference_benchmark"]
    assert (timing["device"], timing["dtype"]) == ("cuda", "float32") and "workloads" in timing

    rows = load_batches(run / "gradprune" / "rows" / BATCHES_FILE)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    on_cpu = criteria.block_influence(base, rows["calibration"])
    assert report["criterion"]["block_influence"] == pytest.approx(on_cpu, abs=1e-4)
    assert sorted(report["dropped_layers"]) == sorted(sorted(range(6), key=lambda j: (on_cpu[j], -j))[:2])
    pruned_model = AutoModelForCausalLM.from_pretrained(pruned).eval()
    guard = report["quality_guard"]
    assert guard["rows"] == 32 and guard["kl"] > 0
    assert guard["kl"] == pytest.approx(reference.kl_to(base, pruned_model, rows["guard"]), rel=1e-3)

    checkpoint_dir = run / "checkpoint-6"
    assert json.loads((checkpoint_dir / "args.json").read_text())["model"] == str(pruned)
    losses = logged_losses(run)
    assert len(losses) == 6 and all(loss == loss for loss in losses)


# -- the prune step in-process ---------------------------------------------------------------------------


def test_bfloat16_prune_step_on_rank_0s_gpu_frees_it_afterwards(tiny_checkpoint, tmp_path):
    """A bfloat16 checkpoint: the real device plan puts it on cuda:0; criterion, guard, timing run there in
    bfloat16 (the guard's head in float32 slices); the saved model is bfloat16; no GPU memory is left held."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, calibration, guard = tiny_checkpoint
    model_dir = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(base).save_pretrained(model_dir)
    before = _settled_cuda_memory()
    lines: list[str] = []
    result = _prune(model_dir, tmp_path / "out", GradPruneConfig(prune_layers=2), calibration, guard, lines)
    assert "[GradPruner] prune step on cuda:0 (one GPU)" in lines
    timing = result.report["inference_benchmark"]
    assert (timing["device"], timing["dtype"]) == ("cuda", "bfloat16") and "workloads" in timing
    influence = result.report["criterion"]["block_influence"]
    assert len(influence) == 6 and all(value == value for value in influence)
    assert 0 < result.guard.kl < float("inf")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert saved.dtype == torch.bfloat16 and saved.config.num_hidden_layers == 4
    assert torch.cuda.memory_allocated() == before  # the model, the dense targets: all gone


def test_out_of_gpu_memory_frees_the_gpu_before_the_cpu_retry(tiny_checkpoint, tmp_path, monkeypatch):
    """Issue 25 item 4 on CUDA: the first attempt's model (on cuda:0) is freed before the CPU retry starts."""
    model_dir, calibration, guard = tiny_checkpoint
    real = checkpoint.prune_model
    before = _settled_cuda_memory()
    seen: list[tuple[str, int]] = []

    def out_of_memory_once(model, *args, **kwargs):
        seen.append((next(model.parameters()).device.type, torch.cuda.memory_allocated()))
        if len(seen) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "prune_model", out_of_memory_once)
    # a node with more GPUs would try them next (devices.plan_after_oom): the CPU, as on a one-GPU node
    monkeypatch.setattr(checkpoint, "_plan_after_oom", lambda model_dir, plan: CPU)
    lines: list[str] = []
    result = _prune(model_dir, tmp_path / "out", GradPruneConfig(prune_layers=2, benchmark=False), calibration,
                    guard, lines)  # fmt: skip
    assert seen[0][0] == "cuda" and seen[0][1] > before  # the first attempt held the model on the GPU
    assert seen[1] == ("cpu", before)  # ... and none of it when the retry started
    assert any("doing the prune step again on the CPU" in line for line in lines) and len(result.plan.removed) == 2


@two_gpus
def test_a_device_map_over_two_gpus_prunes_as_the_cpu_does(tiny_checkpoint, tmp_path, monkeypatch):
    """Issue 25 item 1: the layers split over cuda:0 and cuda:1 by from_pretrained(device_map='auto',
    max_memory=...); Block Influence, the guard (head and final norm may sit on different GPUs), the surgery,
    the timing and the save give what the CPU gives."""
    from swift_gradpruner.devices import DevicePlan

    model_dir, calibration, guard = tiny_checkpoint
    config = GradPruneConfig(prune_layers=2)
    monkeypatch.setattr(checkpoint, "_device_plan", lambda model_dir: CPU)
    on_cpu = _prune(model_dir, tmp_path / "cpu", config, calibration, guard)
    size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    split = DevicePlan(gpus=(0, 1), max_memory={0: size // 2, 1: 4 * size})
    monkeypatch.setattr(checkpoint, "_device_plan", lambda model_dir: split)
    real_load, maps = checkpoint._load, []

    def load(model_dir, plan):
        model = real_load(model_dir, plan)
        maps.append(dict(model.hf_device_map))
        return model

    monkeypatch.setattr(checkpoint, "_load", load)
    lines: list[str] = []
    spread = _prune(model_dir, tmp_path / "gpus", config, calibration, guard, lines)
    assert "[GradPruner] prune step on cuda:0-1 (device_map over 2 GPUs)" in lines
    assert set(maps[0].values()) == {0, 1}, maps[0]
    assert spread.report["criterion"]["block_influence"] == pytest.approx(
        on_cpu.report["criterion"]["block_influence"], abs=1e-4
    )
    assert spread.plan == on_cpu.plan
    assert spread.guard.kls == pytest.approx(on_cpu.guard.kls, rel=1e-3)
    timing = spread.report["inference_benchmark"]
    assert timing["device"] == "cuda" and "workloads" in timing  # generate through the hooks on both GPUs
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "gpus" / "model.safetensors")
    torch.testing.assert_close(saved, load_file(tmp_path / "cpu" / "model.safetensors"), rtol=0, atol=0)


# -- the paper's method in float16 -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp32_paper_run(tmp_path_factory):
    """The reference float32 run of the paper's method (IGIA scores, one merge) on a tiny Llama."""
    from swift_gradpruner.tiny import create_tiny

    root = tmp_path_factory.mktemp("paper")
    model, data = create_tiny(root / "llama", "llama", num_layers=6, rows=256)
    return root, model, data, _paper_run(root, model, data, "fp32")


def _paper_run(root, model, data, name: str, *extra: str) -> dict:
    from swift_run import COMMON, check, report_of, swift

    out = root / name
    check(swift(
        "sft", "--model", str(model), "--model_type", "llama", "--dataset", str(data), *COMMON,
        "--tuner_type", "lora", "--lora_dropout", "0", "--max_steps", "12", "--save_steps", "12",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--output_dir", str(out),
        "--gradprune", "true", "--gradprune_score", "squared", "--gradprune_merge_layers", "1",
        "--gradprune_prune_layers", "2", "--gradprune_steps", "8", "--gradprune_benchmark", "false", *extra,
        cwd=root, env={"NPROC_PER_NODE": "1"},
    ))  # fmt: skip
    return report_of(out)


@pytest.mark.slow
@pytest.mark.parametrize("deepspeed", [None, "zero3"])
def test_fp16_phase1_removes_the_loss_scale(fp32_paper_run, deepspeed):
    """A real fp16 run: accelerate's GradScaler (plain) or DeepSpeed's dynamic loss scaler (initial scale 2**16)
    multiply the loss; the captured scores must be those of the float32 run, not 2**16 (or 2**64) times them.

    The bound: float16's unit roundoff is 4.9e-4; weights rounded to float16 and a float16 forward/backward
    through 6 layers change each gradient element by ~1e-3 relative, in random directions, and a score sums
    thousands of squared elements, so it moves by about 1e-3; the two runs' LoRA weights drift apart by as
    much over 8 steps (Adam's first step is +-lr by sign, and a sign flips only for elements whose gradient
    is within float16 noise of 0). 3% is 10x that, and still catches any leftover power of 2 or a step
    counted twice or missed. It holds only when both runs used the same steps (an overflowing float16 step
    is skipped by the optimizer and the capture, and the runs then average over different steps)."""
    root, model, data, fp32 = fp32_paper_run
    ds = ("--deepspeed", deepspeed) if deepspeed else ()
    fp16 = _paper_run(root, model, data, f"fp16_{deepspeed}", "--torch_dtype", "float16", "--fp16", "true", *ds)
    assert fp16["steps"] == fp32["steps"], "float16 skipped an overflowing step: the runs average different steps"
    assert fp32["steps"]["used"] == 8 and len(fp16["merged_layers"]) == 1
    compared = 0
    for name, value in fp32["linear_scores"].items():
        if value > 0:
            assert fp16["linear_scores"][name] / value == pytest.approx(1, abs=0.03), name
            compared += 1
    assert compared >= len(fp32["linear_scores"]) // 2


# -- memory between the phases -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("deepspeed", [None, "zero3"])
def test_phase1_hands_back_gpu_memory_and_phase2_peaks_like_a_fresh_run(tmp_path, deepspeed):
    """A 100M-parameter model (400 MB in float32), so a phase-1 leftover would show: after phase 1 (the IGIA
    score needs it) the CUDA memory still allocated is within a few MiB of nothing, and phase 2's peak
    (swift's memory(GiB), whose statistics are restarted between the phases) is at most 1.02x that of the
    same run started fresh on the pruned model."""
    import re

    from swift_gradpruner.tiny import build_model, build_tokenizer, write_dataset
    from swift_run import COMMON, check, run_dir, swift

    tokenizer = build_tokenizer()
    model_dir = tmp_path / "model"
    build_model("llama", 8, len(tokenizer), hidden=1024, heads=8, kv_heads=8, intermediate=2816).save_pretrained(
        model_dir
    )
    tokenizer.save_pretrained(model_dir)
    data = write_dataset(tmp_path / "train.jsonl", 256, 0)
    ds = ("--deepspeed", deepspeed) if deepspeed else ()
    train = ("--model_type", "llama", "--dataset", str(data), *COMMON, "--tuner_type", "lora", "--lora_dropout", "0",
             "--max_steps", "12", "--save_steps", "12", "--per_device_train_batch_size", "4", *ds)  # fmt: skip
    out = tmp_path / "gradprune"
    proc = check(swift("sft", "--model", str(model_dir), *train, "--output_dir", str(out), "--gradprune", "true",
                       "--gradprune_score", "squared", "--gradprune_prune_layers", "3", "--gradprune_steps", "4",
                       "--gradprune_benchmark", "false", cwd=tmp_path, env={"NPROC_PER_NODE": "1"}))  # fmt: skip
    released = re.search(r"phase 1 released its .*\(CUDA memory allocated now: (\d+) MiB\)", proc.output)
    assert released, proc.output[-4000:]
    assert int(released.group(1)) <= 8
    pruned = run_dir(out) / "gradprune" / "model"
    fresh = tmp_path / "fresh"
    check(swift("sft", "--model", str(pruned), *train, "--output_dir", str(fresh), cwd=tmp_path,
                env={"NPROC_PER_NODE": "1"}))  # fmt: skip

    def peak(run) -> float:
        rows = [json.loads(line) for line in (run / "logging.jsonl").read_text().splitlines()]
        return max(float(row["memory(GiB)"]) for row in rows if "memory(GiB)" in row)

    assert peak(run_dir(out)) <= max(1.02 * peak(run_dir(fresh)), peak(run_dir(fresh)) + 0.01)


# -- units -------------------------------------------------------------------------------------------------


def test_igia_rebuild_and_merge_on_cuda_match_cpu():
    gen = torch.Generator().manual_seed(0)
    acc = IGIAAccumulator()
    for _ in range(4):
        acc.update(
            {"model.layers.0.mlp.up_proj": (torch.randn(8, 256, generator=gen), torch.randn(512, 8, generator=gen))}
        )
    name = "model.layers.0.mlp.up_proj"
    f_cpu, f_gpu = acc.igia(name), acc.igia(name, device="cuda")
    assert f_gpu.device.type == "cuda"
    torch.testing.assert_close(f_gpu.cpu(), f_cpu, rtol=1e-10, atol=0)
    retained = torch.randn(512, 256, generator=gen, dtype=torch.float32).bfloat16()
    source = torch.randn(512, 256, generator=gen).bfloat16()
    for mode in ("add", "average", "fisher"):
        own = f_cpu.flip(0) if mode == "fisher" else None
        cpu, _ = merge_linear(retained, [(source, f_cpu)], topp=0.2, mode=mode, retained_importance=own)
        gpu, _ = merge_linear(retained.cuda(), [(source.cuda(), f_gpu)], topp=0.2, mode=mode,
                              retained_importance=None if own is None else own.cuda())  # fmt: skip
        torch.testing.assert_close(gpu.cpu(), cpu)


def test_gradients_spread_over_devices_as_device_map_auto_places_them():
    """Issue 18 item 11: with ``device_map='auto'`` (ms-swift's default for several GPUs in one process,
    e.g. QLoRA 70B) the LoRA gradients of different layers live on different devices; the accumulator
    must take them as they are (it once stacked them into one tensor and failed at the first step)."""
    devices = ["cuda:0", "cuda:1"] if torch.cuda.device_count() > 1 else ["cuda:0", "cpu"]
    gen = torch.Generator().manual_seed(0)
    steps = [
        {f"model.layers.{j}.mlp.up_proj": (torch.randn(4, 32, generator=gen), torch.randn(48, 4, generator=gen))
         for j in range(4)}
        for _ in range(3)
    ]  # fmt: skip
    spread, together = IGIAAccumulator(), IGIAAccumulator()
    for grads in steps:
        together.update(grads)
        spread.update({n: (a.to(devices[j % 2]), b.to(devices[j % 2])) for j, (n, (a, b)) in enumerate(grads.items())})
    assert spread.linear_scores() == pytest.approx(together.linear_scores(), rel=1e-12)
    torch.testing.assert_close(spread.igia("model.layers.1.mlp.up_proj"), together.igia("model.layers.1.mlp.up_proj"))
