"""The fit's fast kernels against their one-line dense definitions in float64: the two-level inverse
CDF of the sampled labels, the upper-strip covariance products, the batched eigendecomposition."""

import pytest
import torch

import msif.curvature.factors as factors_mod
from msif.curvature.factors import symmetric_eigh
from msif.curvature.fit import _CovariancePass, _gram_strips, _mirror_strips
from msif.objectives import CDF_BLOCK, sample_from_probs


def _single_scan(p, u):
    cdf = p.cumsum(-1)
    cdf[..., -1] = 1.0
    return torch.searchsorted(cdf, u.unsqueeze(-1)).squeeze(-1).clamp_max(p.shape[-1] - 1)


@pytest.mark.parametrize("V", [7, 2 * CDF_BLOCK, 2 * CDF_BLOCK + 1, 5 * CDF_BLOCK, 5 * CDF_BLOCK + 37])
def test_two_level_sampling_equals_one_scan(V):
    g = torch.Generator().manual_seed(V)
    p = torch.softmax(3 * torch.randn(3000, V, generator=g, dtype=torch.float64), -1)
    u = torch.rand(3000, generator=g, dtype=torch.float64)
    u[:10], u[10:20] = 0.0, 1.0 - 1e-16  # the ends
    assert torch.equal(sample_from_probs(p, u), _single_scan(p, u))


def test_two_level_sampling_at_exact_block_boundaries():
    """Dyadic probabilities (every partial sum exact): a uniform equal to a block's cumulative sum picks
    that block's last entry, as the single scan does; just above it, the next block's first."""
    V = 4 * CDF_BLOCK
    edges = torch.tensor([1, 2, 3], dtype=torch.float64) * CDF_BLOCK / V
    u = torch.cat([edges, edges + 1e-12])
    p = torch.full((len(u), V), 1.0 / V, dtype=torch.float64)
    y = sample_from_probs(p, u)
    assert torch.equal(y, _single_scan(p, u))
    assert y.tolist() == [CDF_BLOCK - 1, 2 * CDF_BLOCK - 1, 3 * CDF_BLOCK - 1, CDF_BLOCK, 2 * CDF_BLOCK, 3 * CDF_BLOCK]


def test_two_level_sampling_keeps_leading_shape_and_zero_tails():
    p = torch.zeros(2, 3, 4 * CDF_BLOCK + 5, dtype=torch.float64)
    p[..., 3 * CDF_BLOCK + 2] = 0.25
    p[..., 17] = 0.75
    u = torch.tensor([[0.1, 0.74, 0.76], [0.99, 0.3, 0.5]], dtype=torch.float64)
    y = sample_from_probs(p, u)
    assert y.shape == (2, 3)
    assert y.tolist() == [[17, 17, 3 * CDF_BLOCK + 2], [3 * CDF_BLOCK + 2, 17, 17]]


@pytest.mark.parametrize("d", [100, 512, 515, 1030])
@pytest.mark.parametrize("sdt", [torch.float64, torch.float32])
def test_strip_covariance_equals_dense_gram(d, sdt):
    g = torch.Generator().manual_seed(d)
    xs = [torch.randn(n, d, generator=g, dtype=torch.float64) for n in (40, 13)]
    p = _CovariancePass.__new__(_CovariancePass)
    p.acc, p.sdt = {}, sdt
    for x in xs:
        p._add_gram("A/m", x)
    _mirror_strips(p.acc["A/m"])
    dense = sum(x.T @ x for x in xs)
    assert p.acc["A/m"].dtype == sdt
    tol = 1e-12 if sdt == torch.float64 else 1e-5
    torch.testing.assert_close(p.acc["A/m"].double(), dense, rtol=tol, atol=tol * float(dense.abs().max()))
    assert (_gram_strips(d) is None) == (d < 512)


def test_batched_eigh_in_several_stacks(monkeypatch):
    monkeypatch.setattr(factors_mod, "_EIGH_STACK_BYTES", 8 * 16 * 16 * 2)  # two 16×16 per stack
    g = torch.Generator().manual_seed(0)
    mats = {}
    for i, d in enumerate([16, 16, 16, 5, 16, 33, 5]):
        x = torch.randn(d + 3, d, generator=g, dtype=torch.float64)
        mats[i] = (x.T @ x).to(torch.float32 if i % 2 else torch.float64)
    out = symmetric_eigh(mats, scale=0.5)
    assert set(out) == set(mats)
    for k, M in mats.items():
        ev, Q = out[k]
        assert ev.dtype == Q.dtype == torch.float64 and ev.is_contiguous() and Q.is_contiguous()
        torch.testing.assert_close(Q @ torch.diag(ev) @ Q.T, 0.5 * M.double(), rtol=1e-10, atol=1e-10)
        assert bool((ev[1:] >= ev[:-1]).all())
