"""Chained damped inverses (``P_pt P_ft g``) against dense float64 solves, on every route the
cost model can choose: factored or formed gradients, fused or separate changes of basis."""

from __future__ import annotations

import pytest
import torch

from msif.curvature import precondition as pc
from msif.curvature.fit import FitConfig, fit_factors
from msif.curvature.hooks import per_example_factors, per_example_grads
from msif.curvature.precondition import Factored, chain

from helpers import batches, random_answer_examples, random_lm_examples, tiny_neox


def _fits(per_head: bool, strategies=("ekfac", "ekfac")):
    """Two factor sets of one architecture: 'ft' (answer objective, model seed 1), 'pt' (lm, seed 2)."""
    ft_model, pt_model = tiny_neox(seed=1), tiny_neox(seed=2)
    ft = fit_factors(ft_model, batches(random_answer_examples(10, seed=3), 5),
                     FitConfig(objective="answer", strategy=strategies[0], per_head=per_head), fingerprint="ft")
    pt = fit_factors(pt_model, batches(random_lm_examples(10, seed=4), 5),
                     FitConfig(strategy=strategies[1], per_head=per_head), fingerprint="pt")
    return ft_model, ft, pt


def _dense_chain(stages, dense: dict) -> dict:
    """``(G_k+λ_k)⁻¹ ⋯ (G_1+λ_1)⁻¹ vec(g)`` block by block with dense matrices."""
    out = {}
    for m, g in dense.items():
        res = torch.empty_like(g)
        for blk in stages[0][0].modules[m].blocks:
            v = g[:, blk.rows].reshape(g.shape[0], -1).T
            for fs, lam in stages:
                v = torch.linalg.solve(fs.dense_block(blk.name, lam), v)
            res[:, blk.rows] = v.T.reshape(g.shape[0], blk.out_dim, -1)
        out[m] = res
    return out


def _close(got: dict, want: dict, rtol=1e-10):
    for m in want:
        err = float((got[m] - want[m]).norm() / want[m].norm())
        assert err < rtol, (m, err)


@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("factored", [True, False])
def test_two_stages_equal_dense_solves_on_every_route(monkeypatch, per_head, fuse, factored):
    monkeypatch.setattr(pc, "_basis_change_cost", (lambda tm: 0) if fuse else (lambda tm: 10**30))
    monkeypatch.setattr(pc, "_factored_cheaper", lambda tm, T: factored)
    model, ft, pt = _fits(per_head)
    tms = list(ft.modules.values())
    b = batches(random_answer_examples(3, seed=9), 3)[0]
    fac = per_example_factors(model, tms, b, "answer")
    dense = per_example_grads(model, tms, b, "answer")
    for dft, dpt in ((1e-3, "0.1x"), ("1x", 1e-2)):
        stages = [(ft, dft), (pt, dpt)]
        want = _dense_chain([(fs, fs.resolve_damping(d)) for fs, d in stages], dense)
        _close(chain(stages, fac), want)
        _close(chain(stages, dense), want)
        _close(chain(stages[:1], fac), _dense_chain([(ft, ft.resolve_damping(dft))], dense))


@pytest.mark.parametrize("strategies", [("kfac", "ekfac"), ("ekfac", "diagonal"), ("diagonal", "ekfac"), ("diagonal", "kfac")])
def test_mixed_strategies(strategies):
    model, ft, pt = _fits(True, strategies)
    tms = list(ft.modules.values())
    b = batches(random_answer_examples(2, seed=9), 2)[0]
    dense = per_example_grads(model, tms, b, "answer")
    stages = [(ft, 1e-3), (pt, 1e-2)]
    _close(chain(stages, per_example_factors(model, tms, b, "answer")), _dense_chain(stages, dense))


def test_identity_stage_is_skipped_and_leading_dims_kept():
    model, ft, pt = _fits(True, ("identity", "ekfac"))
    tms = list(pt.modules.values())
    g = {m: torch.randn(2, 3, tm.out_features, tm.in_dim, dtype=torch.float64) for m, tm in pt.modules.items()}
    got = chain([(ft, 0.5), (pt, 1e-3)], g)
    flat = {m: x.reshape(6, *x.shape[2:]) for m, x in g.items()}
    want = _dense_chain([(pt, 1e-3)], flat)
    _close({m: x.reshape(6, *x.shape[2:]) for m, x in got.items()}, want)
    assert all(got[m].shape == g[m].shape for m in g)
    assert len(tms) > 0


def test_factored_gradients_are_the_dense_ones_and_pad_exactly():
    model = tiny_neox(seed=1)
    ft = fit_factors(model, batches(random_answer_examples(6, seed=3), 3), FitConfig(objective="answer"), fingerprint="ft")
    tms = list(ft.modules.values())
    exs = random_answer_examples(5, seed=7)
    parts = [per_example_factors(model, tms, b, "answer") for b in batches(exs, 2)]  # batches of different lengths
    dense = per_example_grads(model, tms, batches(exs, 5)[0], "answer")
    for m in dense:
        cat = Factored.cat([p[m] for p in parts])
        assert torch.allclose(cat.dense(), dense[m], rtol=1e-10, atol=1e-13)


def test_mismatched_blocks_are_refused():
    from msif.curvature.factors import FactorError

    _, ft, _ = _fits(True)
    _, _, pt = _fits(False)
    g = {m: torch.randn(1, tm.out_features, tm.in_dim, dtype=torch.float64) for m, tm in ft.modules.items()}
    with pytest.raises(FactorError, match="different blocks"):
        chain([(ft, 1e-3), (pt, 1e-3)], g)
