import pytest
import torch

import reference
from swift_gradpruner.merge import merge_linear, topp_mask


def weights(shape=(12, 9), n_sources=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    retained = torch.randn(shape, generator=gen)
    sources = [(torch.randn(shape, generator=gen), torch.rand(shape, generator=gen) ** 3) for _ in range(n_sources)]
    return retained, sources, torch.rand(shape, generator=gen)


@pytest.mark.parametrize("mode", ["add", "average", "fisher"])
@pytest.mark.parametrize("n_sources", [1, 3])
@pytest.mark.parametrize("topp", [0.2, 0.5, 1.0])
def test_merge_equals_elementwise_reference(mode, n_sources, topp):
    retained, sources, f_r = weights(n_sources=n_sources, seed=n_sources)
    merged, fractions = merge_linear(
        retained, sources, topp=topp, mode=mode, retained_importance=f_r if mode == "fisher" else None
    )
    expected = reference.merge(retained, sources, topp, mode, f_r)
    assert merged.dtype == retained.dtype
    torch.testing.assert_close(merged.double(), expected, rtol=1e-6, atol=1e-6)
    for (w, f), fraction in zip(sources, fractions):
        top = reference.top_indices(f, topp)
        same = {i for i in top if reference.sign(w.flatten()[i]) == reference.sign(retained.flatten()[i])}
        assert fraction == pytest.approx(len(same) / w.numel())


def test_only_top_p_same_sign_elements_change():
    retained, sources, _ = weights(shape=(20, 10), n_sources=1)
    w_m, f_m = sources[0]
    merged, (fraction,) = merge_linear(retained, sources, topp=0.2, mode="add")
    changed = merged != retained
    top = torch.zeros(retained.numel(), dtype=torch.bool)
    top[list(reference.top_indices(f_m, 0.2))] = True
    top = top.reshape(retained.shape)
    same_sign = torch.sign(w_m) == torch.sign(retained)
    assert torch.equal(changed, top & same_sign)
    assert 0 < changed.sum() <= 40  # ceil(0.2 * 200) kept, about half of them agree in sign
    assert fraction == changed.sum().item() / 200
    # Merged elements grew in magnitude, never flipped sign (Eq. 5's purpose).
    assert torch.all(merged[changed].abs() > retained[changed].abs())
    assert torch.all(torch.sign(merged) == torch.sign(retained))


def test_low_precision_weights_are_merged_in_float32_and_cast_back():
    retained, sources, _ = weights()
    merged, _ = merge_linear(retained.bfloat16(), [(w.bfloat16(), f) for w, f in sources], topp=0.2)
    assert merged.dtype == torch.bfloat16
    expected = reference.merge(retained.bfloat16().float(), [(w.bfloat16().float(), f) for w, f in sources], 0.2, "add")
    torch.testing.assert_close(merged.double(), expected.bfloat16().double())


def test_topp_mask_counts_ties_and_zeros():
    f = torch.tensor([0.0, 0.0, 0.0, 0.5, 0.9, 0.1, 0.7, 0.3, 0.2, 0.4])
    assert topp_mask(f, 0.2).nonzero().flatten().tolist() == [4, 6]
    assert topp_mask(f, 0.25).sum() == 3  # ceil(2.5)
    assert topp_mask(f, 1.0).sum() == 7  # zero importance is never kept
    assert topp_mask(torch.zeros(10), 0.5).sum() == 0
    assert topp_mask(torch.ones(10), 0.2).sum() == 10  # ties at the threshold are all kept


def test_bad_arguments():
    retained, sources, _ = weights()
    with pytest.raises(ValueError, match="merge_mode='sum' is invalid"):
        merge_linear(retained, sources, topp=0.2, mode="sum")
    with pytest.raises(ValueError, match="fisher"):
        merge_linear(retained, sources, topp=0.2, mode="fisher")
    with pytest.raises(ValueError, match="shapes differ"):
        merge_linear(retained, [(retained.T, retained.T)], topp=0.2)
