"""The scalability study (paper §5.1): exact GGN, the CG ground truth, and the quick study end to end."""

import json

import pytest
import torch
from helpers import batches, random_lm_examples, tiny_neox, train_steps

from msif.baselines.iterative import conjugate_gradient
from msif.curvature import exact
from msif.curvature.hidden_ggn import hidden_ggn, hidden_ggn_matvec
from msif.eval import scalability as sc
from msif.eval import scalability_report, tinylm
from msif.eval.kronecker import exact_lambdas, nearest_kronecker_basis, offdiagonal_mass
from msif.models.adapters import tracked_modules


def _trained_tiny():
    model = tiny_neox(0, attn_implementation="sdpa", hidden_size=8, intermediate_size=16)
    ex = random_lm_examples(12, seed=1, min_len=3, max_len=7)
    train_steps(model, batches(ex, 4), "lm", steps=30, lr=1e-2)
    return model, ex


def test_dense_ggn_matches_exact_ggn():
    model, ex = _trained_tiny()
    tms = tracked_modules(model)
    G = hidden_ggn(model, tms, ex[:5], rows_per_gemm=7).full
    ref = exact.exact_ggn(model, tms, batches(ex[:5], 5), "lm")
    assert torch.allclose(G, ref, rtol=1e-9, atol=1e-12 * float(ref.abs().max()))


def test_ggn_blocks_and_batched_matvec_match_the_dense_ggn():
    model, ex = _trained_tiny()
    tms = tracked_modules(model)
    layout = exact.param_layout(tms)
    G = hidden_ggn(model, tms, ex[:7]).full
    ranges = list(layout.blocks.values())
    for Gb, (s, e) in zip(hidden_ggn(model, tms, ex[:7], ranges, rows_per_gemm=5).blocks, ranges):
        assert torch.allclose(Gb, G[s:e, s:e], rtol=1e-9, atol=1e-12 * float(G.abs().max()))
    mv = hidden_ggn_matvec(model, tms, ex[:7], batch_size=3)  # padded batches of different lengths
    V = torch.randn(G.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(mv(V), G @ V, rtol=1e-9, atol=1e-12 * float((G @ V).abs().max()))
    assert torch.allclose(mv(V[:, 0]), G @ V[:, 0], rtol=1e-9, atol=1e-12 * float((G @ V).abs().max()))


def test_nearest_kronecker_bases_diagonalise_an_exact_kronecker_block():
    """On a block that is exactly ``S ⊗ A`` the nearest-Kronecker eigenbasis is exact: zero mass off the
    diagonal, and its preconditioner is the dense inverse."""
    g = torch.Generator().manual_seed(0)
    Sx = torch.randn(3, 3, dtype=torch.float64, generator=g)
    Ax = torch.randn(4, 4, dtype=torch.float64, generator=g)
    Sx, Ax = Sx @ Sx.T, Ax @ Ax.T
    Gb = torch.kron(Sx, Ax)
    QS, QA, lam = nearest_kronecker_basis(Gb, 3, 4)
    K = torch.kron(QS, QA)
    rot = K.T @ Gb @ K
    assert float((rot - torch.diag(torch.diagonal(rot))).abs().max()) < 1e-9 * float(rot.abs().max())
    v = torch.randn(12, dtype=torch.float64, generator=g)
    got = (QS @ ((QS.T @ v.reshape(3, 4) @ QA) / (lam + 0.1)) @ QA.T).reshape(-1)
    assert torch.allclose(got, torch.linalg.solve(Gb + 0.1 * torch.eye(12, dtype=torch.float64), v), rtol=1e-8)
    assert offdiagonal_mass(Gb, QS, QA) < 1e-12


def test_cg_ground_truth_matches_dense_solve_in_value_and_sign():
    """CG with matrix-free GGN-vector products, as the study's ground truth, against a dense solve; and the
    sign convention checked by an actual parameter change."""
    model, ex = _trained_tiny()
    tms = tracked_modules(model)
    data = batches(ex[:6], 3)
    G = exact.exact_ggn(model, tms, data, "lm")
    lam = 0.1 * exact.mean_eigenvalue(G)
    q = random_lm_examples(2, seed=9, min_len=4, max_len=6)
    QG = exact.flat_example_grads(model, tms, batches(q, 2)[0], "lm")  # (2, D)
    CGr = exact.flat_example_grads(model, tms, batches(ex[:8], 8)[0], "lm")  # candidates: the data
    mv = exact.ggn_vector_product(model, tms, data, "lm")
    res = conjugate_gradient(mv, QG.T.contiguous(), lam, tol=1e-9)
    assert res.converged and float(res.true_residual.max()) <= 1e-9
    X = exact.damped_solve(G, QG.T.contiguous(), lam)
    assert float((res.x - X).norm() / X.norm()) < 1e-7
    S, Sd = res.x.T @ CGr.T, X.T @ CGr.T
    # the solve is good to 1e-7 relative, so each score is good to ~1e-7 of the largest (not of itself:
    # a score near zero is a difference of large terms; measured 9e-8 absolute against a max of 37)
    assert torch.allclose(S, Sd, rtol=1e-6, atol=1e-6 * float(Sd.abs().max()))
    assert float((S * Sd).sum()) > 0  # not the negative iHVP
    # sign: moving θ along −(G+λI)⁻¹∇ℓ(z) (up-weighting z) changes the query loss by ≈ −ε·score
    theta = exact.flat_params(model, tms)
    qb = batches(q[:1], 1)[0]
    base = float(exact.per_example_losses(model, tms, qb, "lm")[0])
    order = torch.argsort(S[0])
    for z, expect_lower in ((int(order[-1]), True), (int(order[0]), False)):
        step = exact.damped_solve(G, CGr[z], lam)
        eps = 1e-3 / float(step.norm())
        m2 = __import__("copy").deepcopy(model)
        with torch.no_grad():
            for tm, w in zip(tms, exact.unflatten(theta - eps * step, tms).values()):
                mod = m2.get_submodule(tm.name)
                mod.weight.copy_(w[:, : tm.in_features])
                if tm.bias:
                    mod.bias.copy_(w[:, tm.in_features])
        new = float(exact.per_example_losses(m2, tms, qb, "lm")[0])
        assert (new < base) == expect_lower
        assert new - base == pytest.approx(-eps * float(S[0, z]), rel=0.05)


def test_word_vocab_and_data():
    v = tinylm.WordVocab(["The capital of France is Paris.", "the capital of Spain is Madrid."], min_count=2)
    assert v.itos[:4] == list(tinylm.SPECIALS)
    e = v.encode("The capital of Italy is Rome.")
    assert e.input_ids[0] == 1 and e.input_ids[-1] == 2 and e.input_ids.count(3) == 2  # italy, rome unknown
    assert e.target_mask == [True] * (len(e.input_ids) - 1) + [False]


@pytest.fixture(scope="module")
def quick():
    return sc.run(sc.QUICK)


def test_quick_study(quick, tmp_path):
    r = quick
    assert r["training"]["train_loss"][-1] < 0.6 * r["training"]["train_loss"][0]
    assert r["ggn"]["matvec_check_rel_error"] < 1e-10  # matrix-free GVP = dense G
    assert r["ggn"]["batched_matvec_check_rel_error"] < 1e-10
    for key, d in r["dampings"].items():
        gt = d["ground_truth"]
        assert gt["converged"] and gt["sign_ok"] and gt["rel_error_vs_dense"] < 1e-5, key
        M = d["methods"]
        ek, gdp, ceil = M["ekfac"]["spearman_mean"], M["gdp"]["spearman_mean"], M["exact_block"]["spearman_mean"]
        assert ek > gdp + 0.1, (key, ek, gdp)  # EK-FAC clearly above the gradient dot product
        assert ek > ceil - 0.25, (key, ek, ceil)  # and near the block-diagonal ceiling
        assert M["exact_dense"]["spearman_mean"] > 0.999
        assert M["cg_20"]["spearman_mean"] >= M["cg_5"]["spearman_mean"] - 0.02
        assert M["lissa_100"]["spearman_mean"] >= M["lissa_10"]["spearman_mean"] - 0.02
        for name, m in M.items():
            assert -1.0 <= m["spearman_mean"] <= 1.0, name
        sh = M["ekfac"]["influence_share"]
        assert sh["mlp"] + sh["attention"] == pytest.approx(1.0)
        # the refined basis and the best Kronecker basis are reported next to EK-FAC
        assert {"ekfac_refined", "kron_best"} <= set(M)
        # refined query vectors: CG on the full G goes past the block-diagonal ceiling EK-FAC is bound by
        ref = {K: M[f"ekfac_pcg_{K}"] for K in sc.QUICK.refine_query}
        assert all(m["matvecs"] == K + 1 for K, m in ref.items())
        assert ref[10]["spearman_mean"] > max(ceil, ek) + 0.1, (key, ref[10]["spearman_mean"], ceil, ek)
        assert ref[10]["spearman_mean"] >= ref[2]["spearman_mean"] - 0.02
        # beside it: the same from the refined-basis fit, and with the exact block-diagonal preconditioner
        assert all(f"ekfac_refined_pcg_{K}" in M and f"block_pcg_{K}" in M for K in sc.QUICK.refine_query)
        assert M["block_pcg_10"]["spearman_mean"] > ceil + 0.1
    kr = r["kronecker"]["offdiagonal_mass"]
    assert 0 <= kr["best"] <= kr["ekfac"] <= 1 and 0 <= kr["ekfac_refined"] <= 1
    assert [row["epoch"] for row in r["sweep"]] == [10, sc.QUICK.epochs]
    early = r["sweep"][0]
    assert early["train_loss"] > r["training"]["train_loss"][-1]  # an earlier, less trained checkpoint
    assert all(c["converged"] for c in early["cg"].values())
    for v in early["spearman"].values():
        assert v["ekfac"] > v["gdp"] + 0.1 and all(-1 <= x <= 1 for x in v.values())
    paths = scalability_report.write_outputs(r, tmp_path)
    table = open(paths["table"]).read()
    assert "0.612" in table and "EK-FAC" in table and "ceiling" in table
    assert "refined basis" in table and "earlier checkpoints" in table and "`--refine-query 10`" in table
    assert json.loads(open(paths["json"]).read())["model"]["D"] == r["model"]["D"]
    for k in ("figure", "training_curve", "checkpoints"):
        assert open(paths[k], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_bench_scalability(quick, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from msif.cli import app

    monkeypatch.setattr(sc, "run", lambda cfg, progress=None: quick)
    out = CliRunner().invoke(app, ["bench", "scalability", "--quick", "--json", "--out", str(tmp_path), "--no-progress"])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "table.md").exists() and (tmp_path / "spearman_vs_time.png").exists()
    out = CliRunner().invoke(app, ["bench", "scalability", "--quick", "--out", str(tmp_path), "--no-progress"])
    assert out.exit_code == 0 and "EK-FAC" in out.output


def test_exact_lambdas_and_with_lambdas():
    """The exact Λ keeps each block's trace (orthogonal rotation); with the fitted Λ, ``with_lambdas`` gives
    back the library's EK-FAC preconditioner."""
    model, ex = _trained_tiny()
    tms = tracked_modules(model)
    layout = exact.param_layout(tms)
    G = exact.exact_ggn(model, tms, batches(ex[:6], 3), "lm")
    fs = sc.fit(model, ex[:6], "ekfac", "all", 2, 0)
    lam = exact_lambdas(fs, [G[s:e, s:e] for s, e in layout.blocks.values()], layout)
    for b, (s, e) in layout.blocks.items():
        assert float(lam[b].sum()) == pytest.approx(float(torch.diagonal(G[s:e, s:e]).sum()), rel=1e-9)
        assert bool((lam[b] >= -1e-12).all())
    grads = exact.to_modules(exact.flat_example_grads(model, tms, batches(ex[6:8], 2)[0], "lm"), tms)
    ref = fs.precondition(grads, 0.05)
    got = fs.with_lambdas({b: fs.lambdas(b) for b in fs.blocks}).precondition(grads, 0.05)
    for n in ref:
        assert torch.allclose(got[n], ref[n], rtol=1e-10, atol=1e-14)
    before = {b: fs.lambdas(b) for b in fs.blocks}
    exact_fs = fs.with_lambdas(lam)
    for b in fs.blocks:  # the copy holds the exact Λ, the original is untouched
        assert torch.allclose(exact_fs.lambdas(b), lam[b], rtol=1e-12, atol=0) and torch.equal(fs.lambdas(b), before[b])
    # and with the exact Λ it inverts the exact block in the fitted eigenbasis exactly when that basis is exact:
    # check instead that the preconditioner is symmetric positive definite on the block
    v = exact.from_modules(exact_fs.precondition(grads, 0.05), tms)
    g = exact.from_modules(grads, tms)
    assert float((v * g).sum()) > 0


def test_cli_bench_scalability_with_lds(quick, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from msif.cli import app
    from msif.eval import lds

    fake = {"config": {"n_subsets": 2, "fraction": 0.5, "damping": 0.1}, "n_queries": 1, "n_train": 4,
            "methods": {"ekfac": {"mean": 0.25, "std": 0.0, "per_query": [0.25]}},
            "cost": {"subset_training_s": 1.0, "per_model_s": 0.5, "total_s": 2.0}}
    monkeypatch.setattr(sc, "run", lambda cfg, progress=None: dict(quick))
    monkeypatch.setattr(lds, "run", lambda cfg, progress=None: fake)
    out = CliRunner().invoke(app, ["bench", "scalability", "--quick", "--lds", "--out", str(tmp_path), "--no-progress"])
    assert out.exit_code == 0, out.output
    assert "Linear datamodeling score" in out.output and "0.250" in out.output
    assert (tmp_path / "lds.md").exists()
