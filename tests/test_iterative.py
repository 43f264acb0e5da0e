"""Iterative iHVP baselines (msif.baselines.iterative) against dense float64 solves."""

from __future__ import annotations

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from msif.baselines.iterative import (
    ConvergenceWarning,
    LissaDivergedError,
    NotConvergedError,
    arnoldi,
    conjugate_gradient,
    lissa,
    power_iteration,
)
from msif.curvature.exact import damped_solve, exact_ggn, ggn_vector_product, mean_eigenvalue
from msif.data.encoding import Encoded, collate
from msif.models.adapters import tracked_modules


pytestmark = pytest.mark.usefixtures("one_thread")


def _spd(spectrum: torch.Tensor, seed: int) -> torch.Tensor:
    """``Q diag(spectrum) Qᵀ`` with a random orthogonal ``Q``."""
    g = torch.Generator().manual_seed(seed)
    D = spectrum.numel()
    Q, _ = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64, generator=g))
    G = Q @ torch.diag(spectrum.to(torch.float64)) @ Q.T
    return 0.5 * (G + G.T)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def tiny():
    """A tiny GPT-NeoX LM, its batches, and its dense GGN (rank-deficient, ill-conditioned)."""
    cfg = GPTNeoXConfig(
        hidden_size=8, num_attention_heads=2, num_hidden_layers=1, intermediate_size=16, vocab_size=20, max_position_embeddings=32
    )
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    tms = tracked_modules(model)
    exs = [
        Encoded([1, 5, 7, 2, 9, 4], [True] * 5 + [False], index=0),
        Encoded([3, 8, 11], [True, True, False], index=1),
        Encoded([6, 2, 2, 13, 19], [True] * 4 + [False], index=2),
    ]
    batches = [collate(exs[:2]), collate(exs[2:])]
    G = exact_ggn(model, tms, batches, "lm")
    return model, tms, batches, G


@pytest.fixture(scope="module")
def synthetic():
    """D=80 SPD with spectrum spanning 1e-3 … 10 and a clear gap after the top 5."""
    g = torch.Generator().manual_seed(11)
    top = torch.tensor([10.0, 8.0, 6.5, 5.0, 4.0])
    rest = torch.logspace(-3, 0, 75, dtype=torch.float64) * (1 + 0.01 * torch.rand(75, generator=g, dtype=torch.float64))
    return _spd(torch.cat([top.double(), rest]), seed=12)


# ------------------------------------------------------------------------------------------------
# Conjugate gradient


@pytest.mark.parametrize("which", ["synthetic", "tiny"])
def test_cg_matches_dense_solve_with_positive_sign(which, request):
    if which == "synthetic":
        G = request.getfixturevalue("synthetic")
        lam = 1e-2
    else:
        G = request.getfixturevalue("tiny")[3]
        lam = 1e-2 * mean_eigenvalue(G)  # condition number ~1e4
    D = G.shape[0]
    gen = torch.Generator().manual_seed(1)
    V = torch.randn(D, 3, dtype=torch.float64, generator=gen)
    ref = damped_solve(G, V, lam)
    res = conjugate_gradient(lambda x: G @ x, V, lam, tol=1e-11)
    assert res.converged and res.x.shape == V.shape
    assert bool((res.true_residual <= 1e-11).all())
    for j in range(3):
        assert _rel(res.x[:, j], ref[:, j]) < 1e-8
        assert float(res.x[:, j] @ V[:, j]) > 0  # (G+λI)⁻¹ is positive definite: same side as v
    single = conjugate_gradient(lambda x: G @ x, V[:, 0], lam, tol=1e-11)
    assert single.x.shape == (D,) and _rel(single.x, ref[:, 0]) < 1e-8
    assert res.residuals[0, 0] == pytest.approx(1.0)
    assert res.residuals.shape == (res.iterations + 1, 3)


def test_cg_reports_non_convergence(synthetic):
    G = synthetic
    v = torch.ones(G.shape[0], dtype=torch.float64)
    with pytest.raises(NotConvergedError) as info:
        conjugate_gradient(lambda x: G @ x, v, 1e-2, tol=1e-10, max_iter=3)
    r = info.value.result
    assert not r.converged and r.iterations == 3 and float(r.true_residual.max()) > 1e-10
    with pytest.warns(ConvergenceWarning):
        r2 = conjugate_gradient(lambda x: G @ x, v, 1e-2, tol=1e-10, max_iter=3, on_fail="warn")
    assert not r2.converged
    r3 = conjugate_gradient(lambda x: G @ x, v, 1e-2, tol=1e-10, max_iter=3, on_fail="ignore")
    assert not r3.converged and torch.equal(r3.x, r2.x)


def test_cg_on_ggn_vector_product(tiny):
    model, tms, batches, G = tiny
    lam = 0.1 * mean_eigenvalue(G)
    mv = ggn_vector_product(model, tms, batches, "lm")
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(G.shape[0], dtype=torch.float64, generator=gen)
    res = conjugate_gradient(mv, v, lam, tol=1e-10)
    assert res.converged
    assert _rel(res.x, damped_solve(G, v, lam)) < 1e-8


# ------------------------------------------------------------------------------------------------
# Power iteration and LiSSA


def test_power_iteration_finds_lambda_max(synthetic):
    lam, u = power_iteration(lambda x: synthetic @ x, synthetic.shape[0], generator=torch.Generator().manual_seed(0))
    assert lam == pytest.approx(10.0, rel=1e-8)
    assert float((synthetic @ u - 10.0 * u).norm()) < 1e-3


@pytest.mark.parametrize("which", ["synthetic", "tiny"])
def test_lissa_converges_to_dense_solve(which, request):
    if which == "synthetic":
        G = request.getfixturevalue("synthetic")
        lam = 0.5
    else:
        G = request.getfixturevalue("tiny")[3]
        lam = 0.05 * float(torch.linalg.eigvalsh(G).max())
    D = G.shape[0]
    V = torch.randn(D, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref = damped_solve(G, V, lam)
    res = lissa(lambda x: G @ x, V, lam, depth=800, generator=torch.Generator().manual_seed(4))
    lmax = float(torch.linalg.eigvalsh(G).max())
    assert res.scale > lmax + lam  # automatic scale from power iteration, with a margin
    assert _rel(res.x, ref) < 1e-6
    assert res.update_norms[0, -1] < 1e-8
    short = lissa(lambda x: G @ x, V, lam, scale=res.scale, depth=5)
    assert _rel(short.x, ref) > 1e-3  # truncation matters: the comparison above can fail


def test_lissa_diverges_with_too_small_scale(synthetic):
    v = torch.ones(synthetic.shape[0], dtype=torch.float64)
    with pytest.raises(LissaDivergedError):
        lissa(lambda x: synthetic @ x, v, 0.5, scale=0.3 * (10.0 + 0.5), depth=2000)


def test_stochastic_lissa_averages_to_dense_solve(synthetic):
    """Per-step random choice between G + E and G − E (mean G): the estimate's mean is the solve."""
    G = synthetic
    D = G.shape[0]
    gen = torch.Generator().manual_seed(5)
    E = torch.randn(D, D, dtype=torch.float64, generator=gen)
    E = 0.2 * (E + E.T) / D**0.5
    mvs = [lambda x: (G + E) @ x, lambda x: (G - E) @ x]
    lam = 1.0
    v = torch.randn(D, dtype=torch.float64, generator=gen)
    ref = damped_solve(G, v, lam)
    res = lissa(mvs, v, lam, scale=15.0, depth=200, repeats=30, generator=torch.Generator().manual_seed(6))
    one = lissa(mvs, v, lam, scale=15.0, depth=200, repeats=1, generator=torch.Generator().manual_seed(6))
    assert _rel(res.x, ref) < 2e-2
    assert _rel(res.x, ref) < _rel(one.x, ref)


# ------------------------------------------------------------------------------------------------
# Arnoldi


def test_arnoldi_full_rank_reproduces_dense_solve(synthetic):
    G = synthetic
    D = G.shape[0]
    ar = arnoldi(lambda x: G @ x, D, n_iter=D, top_k=D, generator=torch.Generator().manual_seed(0))
    ev = torch.linalg.eigvalsh(G).flip(0)
    assert torch.allclose(ar.eigenvalues, ev, rtol=1e-9, atol=1e-12)
    V = torch.randn(D, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lam = 1e-2
    assert _rel(ar.ihvp(V, lam), damped_solve(G, V, lam)) < 1e-8


def test_arnoldi_full_on_rank_deficient_ggn(tiny):
    """The GGN has many zero eigenvalues: the Krylov space breaks down and must be restarted."""
    G = tiny[3]
    D = G.shape[0]
    assert int((torch.linalg.eigvalsh(G) > 1e-10 * float(G.diagonal().max())).sum()) < D  # rank-deficient
    ar = arnoldi(lambda x: G @ x, D, n_iter=D, top_k=D, generator=torch.Generator().manual_seed(0))
    lam = 1e-2 * mean_eigenvalue(G)
    v = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert _rel(ar.ihvp(v, lam), damped_solve(G, v, lam)) < 1e-7


def _dense_topk_solve(G, V, k, lam):
    ev, U = torch.linalg.eigh(G)
    ev, U = ev.flip(0)[:k], U.flip(1)[:, :k]
    return U @ ((U.T @ V) / (ev + lam)[:, None]), ev


@pytest.mark.parametrize("which", ["synthetic", "tiny"])
def test_arnoldi_top_k_matches_dense_eigen_subspace(which, request):
    if which == "synthetic":
        G = request.getfixturevalue("synthetic")
        k, n_iter = 5, 40
    else:
        G = request.getfixturevalue("tiny")[3]
        ev = torch.linalg.eigvalsh(G).flip(0)
        gaps = ev[:20] / ev[1:21]
        k = int(torch.argmax(gaps[3:])) + 4  # a k ≥ 4 with a clear eigen-gap after it
        n_iter = 120
    D = G.shape[0]
    lam = 1e-2
    ar = arnoldi(lambda x: G @ x, D, n_iter=n_iter, top_k=k, generator=torch.Generator().manual_seed(3))
    V = torch.randn(D, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ref, ev_k = _dense_topk_solve(G, V, k, lam)
    assert torch.allclose(ar.eigenvalues, ev_k, rtol=1e-8)
    assert _rel(ar.ihvp(V, lam), ref) < 1e-6
    assert _rel(ar.ihvp(V, lam), damped_solve(G, V, lam)) > 1e-2  # truncation is visible: not a full solve
    # projection-only variant: influence computed in the k-dimensional space
    P = ar.project(V, lam)
    assert P.shape == (k, 2)
    assert float(P[:, 0] @ P[:, 1]) == pytest.approx(float(V[:, 0] @ ar.ihvp(V[:, 1], lam)), rel=1e-10)
    assert ar.project(V[:, 0], lam).shape == (k,)
