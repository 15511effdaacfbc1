"""GPU checks (skipped without a GPU): the IGIA rebuild and the merge on CUDA agree with the CPU; real fp16
runs (plain, ZeRO-2, ZeRO-3) capture unscaled gradients."""

import pytest
import torch

from swift_gradpruner.importance import IGIAAccumulator
from swift_gradpruner.merge import merge_linear

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible to torch"),
]


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


@pytest.mark.slow
@pytest.mark.parametrize("deepspeed", [None, "zero2", "zero3"])
def test_fp16_phase1_removes_the_loss_scale(tmp_path, deepspeed):
    """A real fp16 run: accelerate's GradScaler (plain) or DeepSpeed's dynamic loss scaler (initial scale
    2**16) multiply the loss; the captured scores must be those of a float32 run, not 2**64 times them.
    Steps that overflowed are skipped by both the optimizer and the capture, so the two runs average over
    slightly different steps: the bound is loose, the error it catches is not."""
    from swift_gradpruner.tiny import create_tiny
    from swift_run import COMMON, check, report_of, swift

    model, data = create_tiny(tmp_path / "llama", "llama", num_layers=6, rows=128)

    def run(name: str, *extra: str) -> dict:
        out = tmp_path / name
        check(swift(
            "sft", "--model", str(model), "--model_type", "llama", "--dataset", str(data), *COMMON,
            "--tuner_type", "lora", "--lora_dropout", "0", "--max_steps", "12", "--save_steps", "12",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--output_dir", str(out),
            "--gradprune", "true", "--gradprune_prune_layers", "2", "--gradprune_steps", "8", *extra,
            cwd=tmp_path, env={"NPROC_PER_NODE": "1"},
        ))  # fmt: skip
        return report_of(out)

    fp32 = run("fp32")
    fp16 = run("fp16", "--torch_dtype", "float16", "--fp16", "true", *(("--deepspeed", deepspeed) if deepspeed else ()))
    assert fp16["steps"]["used"] + fp16["steps"]["skipped_nonfinite"] == 8 and fp16["steps"]["used"] >= 4
    for name, value in fp32["linear_scores"].items():
        if value > 0:
            assert 0.2 < fp16["linear_scores"][name] / value < 5, name


@pytest.mark.slow
@pytest.mark.parametrize("deepspeed", [None, "zero3"])
def test_phase1_hands_back_gpu_memory_and_phase2_peaks_like_a_fresh_run(tmp_path, deepspeed):
    """A 100M-parameter model (400 MB in float32), so a phase-1 leftover would show: after phase 1 the CUDA
    memory still allocated is within a few MiB of nothing, and phase 2's peak (swift's memory(GiB), whose
    statistics are restarted between the phases) is at most 1.02x that of the same run started fresh on
    the pruned model."""
    import json
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
                       "--gradprune_prune_layers", "3", "--gradprune_steps", "4", cwd=tmp_path,
                       env={"NPROC_PER_NODE": "1"}))  # fmt: skip
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
