"""The scalability study's rows at one damping: every method's scores against the CG ground truth.

:func:`damping_rows` takes the study's stages (:class:`Study`, built by :func:`msif.eval.scalability.run`)
and one damping multiple ``c`` (``λ = c · trace(G)/D``, the same absolute λ for every method); each
row holds the method's Spearman and Pearson against the ground truth per query (mean ± std), its
overhead and pair-wise seconds per query (candidate gradients included), and, for the iterative
methods, the matrix-free time those products would cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..baselines.iterative import arnoldi, conjugate_gradient, lissa
from ..curvature import exact
from ..curvature.refine import pcg
from .kronecker import kronecker_precondition
from .timer import Timer

if TYPE_CHECKING:
    from .scalability import Baselines, Curvature, Fits, Gradients, ScalabilityConfig, Setup


def correlations(scores: torch.Tensor, truth: torch.Tensor) -> dict:
    """Spearman and Pearson per query (rows) between ``scores`` and ``truth`` ``(Q, C)``: mean ± std."""
    from scipy.stats import spearmanr

    sp, pe = [], []
    for a, b in zip(scores.double().numpy(), truth.double().numpy()):
        if np.std(a) == 0 or np.std(b) == 0:
            sp.append(0.0)
            pe.append(0.0)
            continue
        sp.append(float(spearmanr(a, b).statistic))
        pe.append(float(np.corrcoef(a, b)[0, 1]))
    return dict(
        spearman_mean=float(np.mean(sp)), spearman_std=float(np.std(sp)),
        pearson_mean=float(np.mean(pe)), pearson_std=float(np.std(pe)), spearman=sp,
    )


@dataclass
class Study:
    """The stages every damping reads."""

    cfg: "ScalabilityConfig"
    st: "Setup"
    gr: "Gradients"
    cv: "Curvature"
    ft: "Fits"
    bl: "Baselines"


class Rows:
    """The methods' rows at one damping ``lam``, scored against ``S_gt (Q, C)``."""

    def __init__(self, s: Study, lam: float, S_gt: torch.Tensor):
        self.s, self.lam, self.S_gt, self.methods = s, lam, S_gt, {}
        self.Vq = s.gr.QG.T.contiguous()  # (D, Q)
        self.Q, self.t_c = s.cfg.n_queries, s.gr.t_c

    def add(self, name: str, S: torch.Tensor, overhead: float, pairwise: float, family: str, **extra) -> None:
        self.methods[name] = dict(family=family, overhead_s=overhead, pairwise_s=pairwise, **correlations(S, self.S_gt), **extra)

    def per_query(self, seconds: float) -> float:
        """Pair-wise seconds per query: ``seconds`` for all queries plus the candidate gradients."""
        return (seconds + self.t_c) / self.Q

    def matrix_free(self, matvecs: int) -> float:
        """Per query: ``matvecs`` batched matrix-free GGN-vector products, plus the candidate gradients."""
        return (matvecs * self.Q * self.s.cv.t_mvq + self.t_c) / self.Q

    def scores(self, X: torch.Tensor) -> torch.Tensor:
        """``(Q, C)`` from query vectors ``X (D, Q)``."""
        return X.T @ self.s.gr.CG.T


def ground_truth(s: Study, lam: float) -> tuple[dict, torch.Tensor, torch.Tensor, float, float, int]:
    """CG to ``cfg.cg_tol`` on the dense ``G``, checked against a dense solve: ``(row, S_gt, S_dense,
    dense seconds, CG seconds, CG iterations)``."""
    G, cfg, CG_ = s.cv.G, s.cfg, s.gr.CG
    Vq = s.gr.QG.T.contiguous()
    with Timer() as t_dense:
        X_dense = exact.damped_solve(G, Vq, lam)
    S_dense = X_dense.T @ CG_.T
    with Timer() as t_cg:
        cg = conjugate_gradient(lambda X: G @ X, Vq, lam, tol=cfg.cg_tol, max_iter=10 * G.shape[0], on_fail="warn")
    S_gt = cg.x.T @ CG_.T
    cos = float((S_gt * S_dense).sum() / (S_gt.norm() * S_dense.norm()))
    row = dict(
        method="cg", tol=cfg.cg_tol, converged=bool(cg.converged), iterations=cg.iterations,
        true_residual_max=float(cg.true_residual.max()),
        rel_error_vs_dense=float((cg.x - X_dense).norm() / X_dense.norm()),
        score_cosine_vs_dense=cos, sign_ok=cos > 0.99, dense_solve_s=t_dense.s, time_s=t_cg.s,
        matrix_free_s=cg.iterations * cfg.n_queries * s.cv.t_mvq,
    )
    return row, S_gt, S_dense, t_dense.s, t_cg.s, cg.iterations


def exact_rows(r: Rows) -> torch.Tensor:
    """The exact block- and module-diagonal solves (the ceiling of any block-diagonal method) and the
    MLP-only one; returns the block-diagonal query vectors ``(D, Q)``."""
    s, t_G = r.s, r.s.cv.t_G
    layout, roles = s.st.layout, s.st.roles
    blk_ranges, mod_ranges = list(layout.blocks.values()), list(layout.modules.values())
    out = {}
    for nm, rngs in (("exact_block", blk_ranges), ("exact_module", mod_ranges)):
        with Timer() as t:
            out[nm] = exact.BlockDiagonal.of(s.cv.G, rngs).solve(r.Vq, r.lam)
        r.add(nm, r.scores(out[nm]), t_G, r.per_query(t.s), "exact block-diagonal (ceiling)")
    # MLP-only exact block diagonal (the ceiling of EK-FAC(MLP))
    mlp_ranges = [rg for n, rg in layout.modules.items() if roles[n] == "mlp"]
    mlp = [rg for rg in blk_ranges if any(s0 <= rg[0] < e0 for s0, e0 in mlp_ranges)]
    X = exact.BlockDiagonal.of(s.cv.G, mlp).solve(r.Vq, r.lam)
    r.add("exact_block_mlp", r.scores(X), t_G, float("nan"), "exact block-diagonal (ceiling)")
    return out["exact_block"]


def _module_scores(U: dict, Cmod: dict, names) -> torch.Tensor:
    return sum(torch.einsum("qoi,coi->qc", U[n], Cmod[n]) for n in names)


def fitted_rows(r: Rows) -> None:
    """Every fitted factor set (EK-FAC variants, K-FAC, diagonal, GDP) at this damping; for EK-FAC also
    the share of |influence| per role."""
    s = r.s
    Qmod, Cmod, roles = s.gr.Qmod, s.gr.Cmod, s.st.roles
    for name, (fs, t_fit) in s.ft.fits.items():
        with Timer() as t:
            U = fs.precondition({n: Qmod[n] for n in fs.modules}, r.lam)
            S = _module_scores(U, Cmod, fs.modules)
            extra = {}
            if name == "ekfac":
                per_role = {ro: sum(torch.einsum("qoi,coi->qc", U[n], Cmod[n]).abs().sum() for n in fs.modules if roles[n] == ro)
                            for ro in ("mlp", "attention")}
                tot = float(sum(per_role.values()))
                extra["influence_share"] = {ro: float(v) / tot for ro, v in per_role.items()}
        r.add(name, S, 0.0 if name == "gdp" else t_fit, r.per_query(t.s),
              "gradient similarity" if name == "gdp" else "parametric (block-diagonal)", **extra)


def refined_rows(r: Rows) -> None:
    """EK-FAC refined by K steps of CG on the full G, preconditioned by and started from EK-FAC (and from
    the refined-basis fit: `--refine-basis 1` with `--refine-query K`); beside it the same refinement
    with the exact block-diagonal GGN as preconditioner and start, the best any block-diagonal
    preconditioner can do (how much of the refinement's gap is EK-FAC's)."""
    s, lam = r.s, r.lam
    G, tms, Qmod = s.cv.G, s.st.tms, s.gr.Qmod
    dense_gvp = lambda V: exact.to_modules((G @ exact.from_modules(V, tms).T).T, tms)  # noqa: E731  (G V on module dicts)
    for base in ("ekfac", "ekfac_refined"):
        fs_ek, t_ek = s.ft.fits[base]
        for K in s.cfg.refine_query:
            with Timer() as t:
                res = pcg(dense_gvp, lam, Qmod, lambda V, fs_ek=fs_ek: fs_ek.precondition(V, lam), K)
            r.add(f"{base}_pcg_{K}", exact.from_modules(res.x, tms) @ s.gr.CG.T, t_ek, r.per_query(t.s),
                  "parametric + refinement", matvecs=K + 1, matrix_free_s=r.matrix_free(K + 1),
                  max_relative_residual=float(res.residuals[-1].max()) if res.residuals else None)
    block_inverse = exact.BlockDiagonal.of(G, list(s.st.layout.blocks.values())).inverse(lam)

    def blk_pre(V):
        return exact.to_modules(block_inverse(exact.from_modules(V, tms).T.contiguous()).T, tms)

    for K in s.cfg.refine_query:
        res = pcg(dense_gvp, lam, Qmod, blk_pre, K)
        r.add(f"block_pcg_{K}", exact.from_modules(res.x, tms) @ s.gr.CG.T, s.cv.t_G, float("nan"),
              "diagnostic (exact block-diagonal preconditioner)", matvecs=K + 1)


def kronecker_rows(r: Rows) -> None:
    """EK-FAC's fitted eigenbasis with the exact Λ (what infinitely many label draws give), and the
    nearest-Kronecker eigenbasis of each exact block with the exact Λ."""
    s = r.s
    fs, t_fit = s.ft.fits["ekfac"]
    with Timer() as t:
        U = fs.with_lambdas(s.ft.lam_exact).precondition(s.gr.Qmod, r.lam)
        S = _module_scores(U, s.gr.Cmod, U)
    r.add("ekfac_exact_lambda", S, t_fit, r.per_query(t.s), "diagnostic (exact Λ in the fitted eigenbasis)")
    with Timer() as t:
        X = kronecker_precondition(s.ft.kron_best, list(s.st.layout.blocks.values()), r.Vq, r.lam)
    r.add("kron_best", r.scores(X), s.cv.t_G + s.ft.t_kron, r.per_query(t.s),
          "diagnostic (best single-Kronecker eigenbasis per block, exact Λ)")


def influence_share(s: Study, X_block: torch.Tensor) -> dict[str, float]:
    """Share of total |influence| of the exact block-diagonal solve ``X_block (D, Q)`` per role."""
    contrib = {ro: 0.0 for ro in ("mlp", "attention")}
    for n, (a, e) in s.st.layout.modules.items():
        contrib[s.st.roles[n]] += float((X_block[a:e].T @ s.gr.CG[:, a:e].T).abs().sum())
    tot = sum(contrib.values())
    return {ro: v / tot for ro, v in contrib.items()}


def iterative_rows(r: Rows) -> None:
    """LiSSA, CG at fixed budgets and Arnoldi on the dense G (matrix-free time = matvecs × one GVP)."""
    s, lam, Vq = r.s, r.lam, r.Vq
    G, cfg = s.cv.G, s.cfg
    for d in cfg.lissa_depths:
        with Timer() as t:
            lr_ = lissa(lambda X: G @ X, Vq, lam, scale=1.1 * (s.cv.lam_max + lam), depth=d)
        r.add(f"lissa_{d}", r.scores(lr_.x), 0.0, r.per_query(t.s), "iterative", matvecs=d, matrix_free_s=r.matrix_free(d))
    for b in cfg.cg_budgets:
        with Timer() as t:
            res = conjugate_gradient(lambda X: G @ X, Vq, lam, tol=1e-30, max_iter=b, on_fail="ignore")
        r.add(f"cg_{b}", r.scores(res.x), 0.0, r.per_query(t.s), "iterative", matvecs=b, matrix_free_s=r.matrix_free(b))
    D = G.shape[0]
    for k in cfg.arnoldi_k:
        with Timer() as t_over:
            ar = arnoldi(lambda X: G @ X, D, n_iter=min(2 * k, D), top_k=k, generator=torch.Generator().manual_seed(0))
        with Timer() as t:
            S = ar.ihvp(Vq, lam).T @ s.gr.CG.T
        r.add(f"arnoldi_{k}", S, t_over.s, r.per_query(t.s), "iterative (eigenpairs)",
              matvecs=min(2 * k, D), overhead_matrix_free_s=min(2 * k, D) * s.cv.t_mv)


def damping_rows(s: Study, c: float) -> dict:
    """The results of one damping multiple ``c``: ``lambda``, ``ground_truth``, ``methods`` (one row per
    method, in the table's order) and ``influence_share_exact_block``."""
    lam = c * s.cv.mean_eig
    out: dict = {"lambda": lam}
    gt, S_gt, S_dense, t_dense, t_cg, iters = ground_truth(s, lam)
    out["ground_truth"] = gt
    r = Rows(s, lam, S_gt)
    out["methods"] = r.methods
    r.add("cg", S_gt, 0.0, r.per_query(t_cg), "ground truth", matrix_free_s=r.matrix_free(iters), matvecs=iters)
    r.add("exact_dense", S_dense, s.cv.t_G, r.per_query(t_dense), "exact")
    X_block = exact_rows(r)
    fitted_rows(r)
    refined_rows(r)
    kronecker_rows(r)
    out["influence_share_exact_block"] = influence_share(s, X_block)
    iterative_rows(r)
    bl = s.bl
    r.add("trak", bl.S_trak, bl.t_trak_over, bl.t_trak_pair, "retraining", models=s.cfg.trak_models, dim=s.cfg.trak_dim)
    r.add("trak_single_model", bl.S_trak1, bl.t_trak1_over, bl.t_trak_pair, "retraining (diagnostic: analysed model only)")
    r.add("cka", bl.S_cka, 0.0, bl.t_cka, "gradient similarity")
    return out
