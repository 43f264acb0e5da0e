"""TRAK and CKA baselines against small dense computations."""

import math

import pytest
import torch
from helpers import batches, random_lm_examples, tiny_neox

from msif.baselines.cka import centered_gram_features, gradient_cka, linear_cka
from msif.baselines.trak import Projector, TrakFeatures, output_function_grads, trak_scores
from msif.curvature.exact import flatten
from msif.models.adapters import tracked_modules


def _cka_hsic(X, Y):
    """CKA via the centring matrix H and Gram matrices (Kornblith et al., eq. 4 with linear kernels)."""
    n = X.shape[0]
    H = torch.eye(n, dtype=torch.float64) - 1.0 / n
    K, L = H @ (X @ X.T) @ H, H @ (Y @ Y.T) @ H
    return float((K * L).sum() / (K.norm() * L.norm()))


def test_linear_cka_matches_hsic_form_and_invariances():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(7, 5, generator=g, dtype=torch.float64)
    Y = torch.randn(7, 9, generator=g, dtype=torch.float64)
    assert linear_cka(X, Y) == pytest.approx(_cka_hsic(X, Y), rel=1e-12)
    assert linear_cka(X, X) == pytest.approx(1.0, rel=1e-12)
    Qo, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    assert linear_cka(3.0 * X @ Qo + 2.0, Y) == pytest.approx(linear_cka(X, Y), rel=1e-10)  # orthogonal, scale, shift
    assert 0.0 <= linear_cka(X, Y) <= 1.0
    assert linear_cka(torch.ones(4, 3, dtype=torch.float64), X[:4]) == 0.0


def test_gradient_cka_is_mean_over_layers_of_pairwise_cka():
    g = torch.Generator().manual_seed(1)
    q = {"a": torch.randn(2, 4, 3, generator=g, dtype=torch.float64), "b": torch.randn(2, 6, 2, generator=g, dtype=torch.float64)}
    c = {"a": torch.randn(5, 4, 3, generator=g, dtype=torch.float64), "b": torch.randn(5, 6, 2, generator=g, dtype=torch.float64)}
    S = gradient_cka(q, c)
    assert S.shape == (2, 5)
    for i in range(2):
        for j in range(5):
            ref = (linear_cka(q["a"][i], c["a"][j]) + linear_cka(q["b"][i], c["b"][j])) / 2
            assert float(S[i, j]) == pytest.approx(ref, rel=1e-10)
    f = centered_gram_features(q["a"])
    assert torch.allclose(f.norm(dim=1), torch.ones(2, dtype=torch.float64))


def test_projector_is_deterministic_chunked_and_unbiased():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 50, generator=g, dtype=torch.float64)
    p1 = Projector(50, 16, "rademacher", seed=3, chunk=7)
    P = p1.matrix()
    assert P.shape == (50, 16) and set(P.unique().tolist()) == {-1.0, 1.0}
    assert torch.allclose(p1(x), x @ P / 4.0)
    assert torch.allclose(p1(x), Projector(50, 16, "rademacher", seed=3, chunk=7)(x))
    assert not torch.allclose(p1(x), Projector(50, 16, "rademacher", seed=4, chunk=7)(x))
    assert torch.equal(Projector(50, None)(x), x)
    # inner products are preserved in expectation: with k large the error is small
    for kind in ("gaussian", "rademacher"):
        pr = Projector(50, 4000, kind, seed=0)
        a, b = pr(x[:1]), pr(x[1:2])
        assert float(a @ b.T) == pytest.approx(float(x[0] @ x[1]), abs=0.15 * float(x[0].norm() * x[1].norm()))
        assert float(a.norm()) == pytest.approx(float(x[0].norm()), rel=0.1)


def test_output_function_grads_match_autograd():
    model = tiny_neox(0)
    tms = tracked_modules(model)
    b = batches(random_lm_examples(3, seed=4, min_len=3, max_len=8), 3)[0]  # padded batch
    G, Q = output_function_grads(model, tms, b)
    for n in range(b.size):
        L = int(b.attention_mask[n].sum())
        ids = b.input_ids[n : n + 1, :L]
        logits = model(input_ids=ids).logits[0]
        logp = torch.log_softmax(logits, -1)[:-1]
        lp = logp.gather(-1, ids[0, 1:, None]).squeeze(-1)
        f = (lp - torch.log1p(-lp.exp())).sum()
        params = []
        for tm in tms:
            mod = model.get_submodule(tm.name)
            params += [mod.weight] + ([mod.bias] if tm.bias else [])
        grads = torch.autograd.grad(f, params)
        mats, i = {}, 0
        for tm in tms:
            w = grads[i]
            i += 1
            if tm.bias:
                w = torch.cat([w, grads[i][:, None]], 1)
                i += 1
            mats[tm.name] = w
        ref = flatten(mats, tms)
        assert torch.allclose(G[n], ref, rtol=1e-8, atol=1e-10)
        assert float(Q[n]) == pytest.approx(1 - float(lp.detach().exp().mean()), rel=1e-10)


def test_trak_scores_match_dense_formula():
    g = torch.Generator().manual_seed(5)
    feats = []
    for _ in range(2):
        feats.append(TrakFeatures(torch.randn(20, 6, generator=g, dtype=torch.float64),
                                  torch.rand(20, generator=g, dtype=torch.float64),
                                  torch.randn(3, 6, generator=g, dtype=torch.float64)))
    cand = torch.tensor([1, 4, 7, 19])
    S = trak_scores(feats, cand)
    kern = sum(f.queries @ torch.linalg.inv(f.train.T @ f.train) @ f.train[cand].T for f in feats) / 2
    qbar = sum(f.q_train[cand] for f in feats) / 2
    assert torch.allclose(S, kern * qbar, rtol=1e-9)
    # a single model, all candidates: exactly φ_q (ΦᵀΦ)⁻¹ Φᵀ diag(Q)
    f = feats[0]
    S1 = trak_scores([f])
    assert torch.allclose(S1, (f.queries @ torch.linalg.solve(f.train.T @ f.train, f.train.T)) * f.q_train, rtol=1e-9)
    # ridge shrinks the scores
    assert float(trak_scores([f], ridge=10.0).abs().sum()) < float(S1.abs().sum())


def test_trak_on_a_model_agrees_in_sign_with_the_loss_gradient():
    """The TRAK feature of a sequence is ∇f, and ∇ℓ = −Σ_t (1 − p_t) ∇f_t: for a one-token sequence exactly
    ∇ℓ = −(1 − p) ∇f, so up to the positive factor Q the score has the influence sign convention."""
    model = tiny_neox(1)
    tms = tracked_modules(model)
    from msif.curvature.exact import flat_example_grads

    ex = random_lm_examples(4, seed=6, min_len=2, max_len=2)  # one counted prediction each
    b = batches(ex, 4)[0]
    Gf, Q = output_function_grads(model, tms, b)
    Gl = flat_example_grads(model, tms, b, "lm")
    assert torch.allclose(Gl, -Q[:, None] * Gf, rtol=1e-8, atol=1e-12)
    assert math.isfinite(float(Q.sum()))
