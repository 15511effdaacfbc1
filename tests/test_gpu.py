"""GPU checks: the IGIA rebuild and the merge on CUDA agree with the CPU (skipped without a GPU)."""

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
