"""Acceptance study of EK-FAC influence scores against the exact damped GGN (issue 2).

On a tiny float64 GPT-NeoX trained on structured synthetic sequences (until its predictions are far
from uniform), influence scores ``q_iᵀ (M + λI)⁻¹ g_c`` of the training sequences (the candidates)
on held-out queries are computed with

* exact curvature ``M`` (dense, float64, from Jacobians and the analytic softmax Hessian, no
  sampling): the full GGN ``G``; ``G`` restricted to the per-head block-diagonal structure that
  EK-FAC approximates (``block``); ``G`` restricted to whole modules (``module``);
* the library's fitted factors (:func:`msif.curvature.fit.fit_factors`): EK-FAC, K-FAC, diagonal,
  identity (gradient dot product), fitted on the same training sequences with labels sampled from the
  model, each sequence replicated ``R`` times under distinct dataset indices (fresh labels per copy:
  a Monte-Carlo average of the true Fisher = GGN over ``R`` label draws per position),

at dampings that are multiples of the mean eigenvalue of ``G`` (``trace(G) / D``), the **same absolute
λ** for every method. Each method's scores are compared with Spearman's ρ per query over the
candidates, then averaged over queries (mean ± std).

Diagnostics: the fitted EK-FAC ``Λ`` against the exact rotated block diagonal
``diag((Q_S⊗Q_A)ᵀ G_block (Q_S⊗Q_A))`` (which ``Λ`` estimates without bias), EK-FAC with that exact
``Λ`` in the fitted eigenbasis (``ekfac_exact_lambda``: what infinitely many label samples would give),
the trend of EK-FAC's agreement with ``R``, and a negative control (EK-FAC with its ``Λ`` shuffled
within each block) that must score visibly worse.

Data: a topic-conditioned sparse Markov chain. Token 0 pads; tokens ``1..n_topics`` mark the topic of
a sequence (its first token); the rest follow a topic-specific transition table where each token has
``branching`` successors. Predicting the next token needs the current token and the topic (attention
to the first position), and the best achievable predictive entropy is far below ``log V``.

:func:`run_study` returns a JSON-serialisable dict, stage by stage (:func:`sample_data`, :func:`train`,
:func:`exact_curvature`, the fitted methods' scores, :func:`diagnostics`); the exact GGN and its solves
are :mod:`msif.curvature.exact`'s, the Kronecker diagnostics :mod:`msif.eval.kronecker`'s.
``benchmarks/ekfac_accuracy.py`` prints it as a table, ``tests/test_ekfac_accuracy.py`` checks the
acceptance thresholds on it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from scipy.stats import spearmanr

from ..curvature import exact
from ..curvature.factors import FactorSet
from ..curvature.fit import FitConfig
from ..data.encoding import Encoded, collate
from ..models.adapters import tracked_modules
from . import tinylm
from .kronecker import exact_lambdas, lambda_rel_error, offdiagonal_share
from .timer import Timer

METHODS = ("ekfac", "kfac", "diagonal", "identity")


@dataclass
class StudyConfig:
    """Sizes and settings of the study (defaults: the benchmark's configuration)."""

    # model
    vocab: int = 32
    hidden: int = 16
    layers: int = 2
    heads: int = 2
    intermediate: int = 32
    # data: topic-conditioned sparse Markov chain
    n_topics: int = 3
    branching: int = 3
    min_len: int = 8
    max_len: int = 12
    n_train: int = 300  # training sequences = the candidates = the data of G and of the factors
    n_queries: int = 8  # held-out sequences; measurement = summed LM loss
    # training
    train_steps: int = 400
    train_batch: int = 32
    lr: float = 1e-2
    # curvature
    replicates: int = 32  # R: label draws per training sequence for the fitted factors
    replicate_trend: tuple[int, ...] = (1, 4, 16)  # extra EK-FAC fits to show the trend with R
    dampings: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)  # multiples of trace(G)/D
    methods: tuple[str, ...] = METHODS
    full: bool = True  # also the full (not block-diagonal) exact GGN (costs D² per GGN row)
    module_level: bool = True  # also the module-level block-diagonal exact GGN
    diagnostics: bool = True  # Λ check, exact-Λ EK-FAC, shuffled-Λ control
    fit_batch: int = 64
    seed: int = 0


# --------------------------------------------------------------------------------------------------
# Data: the chain


def make_chain(cfg: StudyConfig, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``start (n_topics, V)`` and ``trans (n_topics, V, V)``: sparse topic-specific distributions over
    content tokens ``n_topics+1 .. V-1``."""
    V, K = cfg.vocab, cfg.n_topics
    content = torch.arange(K + 1, V)
    C = len(content)
    if C < cfg.branching + 1:
        raise ValueError("vocabulary too small for the chain")

    def sparse_row() -> torch.Tensor:
        row = torch.zeros(V, dtype=torch.float64)
        pick = content[torch.randperm(C, generator=g)[: cfg.branching]]
        w = -torch.log(torch.rand(cfg.branching, generator=g, dtype=torch.float64))  # Dirichlet(1)
        row[pick] = w / w.sum()
        return row

    start = torch.stack([sparse_row() for _ in range(K)])
    trans = torch.zeros(K, V, V, dtype=torch.float64)
    for k in range(K):
        for v in content.tolist():
            trans[k, v] = sparse_row()
    return start, trans


def sample_sequences(cfg: StudyConfig, start, trans, n: int, g: torch.Generator, first_index: int = 0) -> list[Encoded]:
    out = []
    for i in range(n):
        k = int(torch.randint(cfg.n_topics, (), generator=g))
        L = int(torch.randint(cfg.min_len, cfg.max_len + 1, (), generator=g))
        ids = [k + 1, int(torch.multinomial(start[k], 1, generator=g))]
        while len(ids) < L:
            ids.append(int(torch.multinomial(trans[k, ids[-1]], 1, generator=g)))
        out.append(Encoded(ids, [True] * (L - 1) + [False], index=first_index + i))
    return out


def chain_entropy(cfg: StudyConfig, start, trans, examples: list[Encoded]) -> float:
    """Mean entropy (nats) of the true next-token distribution over the counted positions: the floor."""
    tot, n = 0.0, 0
    for e in examples:
        k = e.input_ids[0] - 1
        dists = [start[k]] + [trans[k, v] for v in e.input_ids[1:-1]]
        for p in dists:
            q = p[p > 0]
            tot += float(-(q * q.log()).sum())
            n += 1
    return tot / n


def build_model(cfg: StudyConfig):
    """The study's float64 GPT-NeoX (token 0 pads, begins and ends)."""
    return tinylm.build_model(cfg.vocab, cfg.hidden, cfg.layers, cfg.heads, cfg.intermediate, cfg.seed,
                              max_positions=max(64, cfg.max_len), bos_id=0, eos_id=0, dtype=torch.float64)


def train(model, cfg: StudyConfig, train_ex: list[Encoded], held_ex: list[Encoded]) -> dict:
    """Adam on the mean token loss of minibatches of the training sequences. Returns the loss curve."""
    full = tinylm.batches(train_ex, 100)
    curve = tinylm.train_steps(model, train_ex, cfg.train_steps, cfg.train_batch, cfg.lr, cfg.seed, full)
    return dict(
        loss_curve=curve,
        train_loss_start=curve[0][1],
        train_loss_end=curve[-1][1],
        heldout_loss=tinylm.mean_token_loss(model, [collate(held_ex)]),
        mean_entropy=tinylm.mean_entropy(model, full),
        log_vocab=math.log(cfg.vocab),
    )


def fit(model, train_ex: list[Encoded], strategy: str, R: int, cfg: StudyConfig, seed: int | None = None) -> FactorSet:
    """Factors fitted with sampled labels on ``R`` copies of every training sequence."""
    conf = FitConfig(strategy=strategy, labels="sampled", seed=cfg.seed if seed is None else seed)
    return tinylm.fit(model, train_ex, R, conf, batch_size=cfg.fit_batch, fingerprint="ekfac-accuracy-study")


def _grads(model, tms, examples: list[Encoded], chunk: int = 8) -> torch.Tensor:
    """Exact per-sequence gradients of the summed LM loss (data labels): ``(n, D)`` float64."""
    return torch.cat([exact.flat_example_grads(model, tms, collate(examples[i : i + chunk]), "lm")
                      for i in range(0, len(examples), chunk)])


def spearman_per_query(a: torch.Tensor, b: torch.Tensor) -> dict:
    """``a, b (n_candidates, n_queries)`` → mean ± std over queries of Spearman's ρ per query column."""
    rhos = []
    for j in range(a.shape[1]):
        r = spearmanr(a[:, j].numpy(), b[:, j].numpy()).statistic
        rhos.append(float(r) if r == r else 0.0)
    return dict(mean=float(np.mean(rhos)), std=float(np.std(rhos)), per_query=rhos)


def _key(c: float) -> str:
    return f"{c:g}x"


# --------------------------------------------------------------------------------------------------
# Stages


@dataclass
class StudyData:
    """The chain and the sequences sampled from it: training sequences (= candidates) and queries."""

    start: torch.Tensor
    trans: torch.Tensor
    train_ex: list[Encoded]
    query_ex: list[Encoded]


def sample_data(cfg: StudyConfig) -> StudyData:
    g = torch.Generator().manual_seed(cfg.seed)
    start, trans = make_chain(cfg, g)
    train_ex = sample_sequences(cfg, start, trans, cfg.n_train, g)
    query_ex = sample_sequences(cfg, start, trans, cfg.n_queries, g, first_index=10**6)
    return StudyData(start, trans, train_ex, query_ex)


@dataclass
class ExactCurvature:
    """The exact GGN of the training sequences: full (``cfg.full``), its module-level diagonal blocks
    (full or ``cfg.module_level``), its per-head blocks (always), and ``trace(G)/D``."""

    G: torch.Tensor | None
    mod_blocks: list[torch.Tensor] | None
    blk_blocks: list[torch.Tensor]
    mean_eig: float


def exact_curvature(model, tms, layout: exact.Layout, train_ex: list[Encoded], cfg: StudyConfig) -> ExactCurvature:
    """Full on request, else only the diagonal blocks (module-level ones contain the per-head ones)."""
    mod_ranges = list(layout.modules.values())
    blk_ranges = list(layout.blocks.values())
    seqs = [collate([e]) for e in train_ex]  # one sequence at a time: its Jacobian rows only touch itself
    G, mod_blocks = None, None
    if cfg.full:
        parts = exact.ggn_parts(model, tms, seqs, "lm", diagonal=True)
        G = parts.full
        mod_blocks = [G[s:e, s:e].clone() for s, e in mod_ranges]
        blk_blocks = [G[s:e, s:e].clone() for s, e in blk_ranges]
    elif cfg.module_level:
        parts = exact.ggn_parts(model, tms, seqs, "lm", mod_ranges, diagonal=True)
        mod_blocks = parts.blocks
        blk_blocks = []
        for s, e in blk_ranges:
            (ms, _), Gm = next(((ms, me), Gm) for (ms, me), Gm in zip(mod_ranges, mod_blocks) if ms <= s and e <= me)
            blk_blocks.append(Gm[s - ms : e - ms, s - ms : e - ms].clone())
    else:
        parts = exact.ggn_parts(model, tms, seqs, "lm", blk_ranges, diagonal=True)
        blk_blocks = parts.blocks
    return ExactCurvature(G, mod_blocks, blk_blocks, float(parts.diagonal.sum()) / layout.D)


class Scoring:
    """Scores ``Gc (M + λI)⁻¹ Q`` ``(n_candidates, n_queries)`` at every damping, for a solver ``(Q, λ) ↦ X``."""

    def __init__(self, Gc: torch.Tensor, Q: torch.Tensor, lams: dict[str, float], tms):
        self.Gc, self.Q, self.lams, self.tms = Gc, Q, lams, tms

    def scores(self, solve) -> dict[str, torch.Tensor]:
        return {k: self.Gc @ solve(self.Q, lam) for k, lam in self.lams.items()}

    def factor_solver(self, fs: FactorSet):
        """``(Q (D, k), λ) ↦`` the factors' damped inverse applied to ``Q``, ``(D, k)``."""
        tms = self.tms

        def solve(Q: torch.Tensor, lam: float) -> torch.Tensor:
            return exact.from_modules(fs.precondition(exact.to_modules(Q.T.contiguous(), tms), float(lam)), tms).T

        return solve

    def compare(self, ref: dict[str, torch.Tensor], which: dict) -> dict:
        """``{method: {damping: Spearman per query against ref}}``."""
        return {m: {k: spearman_per_query(sc[k], ref[k]) for k in self.lams} for m, sc in which.items()}


def exact_solvers(cv: ExactCurvature, layout: exact.Layout) -> dict:
    """The exact solves ``(Q, λ) ↦ (M + λI)⁻¹ Q``: per-head block-diagonal, module-diagonal, full."""
    blocks = exact.BlockDiagonal(cv.blk_blocks, list(layout.blocks.values()))
    solvers = {"exact_block": lambda Q, lam: blocks.solve(Q, lam, method="eigh")}
    if cv.mod_blocks is not None:
        modules = exact.BlockDiagonal(cv.mod_blocks, list(layout.modules.values()))
        solvers["exact_module"] = lambda Q, lam: modules.solve(Q, lam, method="eigh")
    if cv.G is not None:
        solvers["exact_full"] = lambda Q, lam: exact.damped_solve(cv.G, Q, lam)
    return solvers


# --------------------------------------------------------------------------------------------------
# Diagnostics


def lambda_check(fs: FactorSet, cv: ExactCurvature, layout: exact.Layout, cfg: StudyConfig) -> tuple[dict, dict, dict]:
    """The fitted Λ against the exact one, per block; returns the check, the exact Λ and the fitted Λ
    shuffled within each block (the negative control)."""
    lam_exact = exact_lambdas(fs, cv.blk_blocks, layout)
    rel, corr, shuffled = [], [], {}
    gsh = torch.Generator().manual_seed(cfg.seed + 7)
    for bname, le in lam_exact.items():
        lf = fs.lambdas(bname)
        rel.append(float((lf - le).norm() / le.norm()))
        corr.append(float(spearmanr(lf.reshape(-1).numpy(), le.reshape(-1).numpy()).statistic))
        shuffled[bname] = lf.reshape(-1)[torch.randperm(lf.numel(), generator=gsh)].reshape(lf.shape)
    share, per_module = offdiagonal_share(fs, cv.blk_blocks, layout)
    check = dict(
        rel_error_total=lambda_rel_error(fs, lam_exact),
        rel_error_per_block_median=float(np.median(rel)),
        rel_error_per_block_max=float(np.max(rel)),
        spearman_per_block_min=float(np.min(corr)),
        spearman_per_block_median=float(np.median(corr)),
        # share of G_block's Frobenius norm² off the Kronecker eigenbasis diagonal: what no Λ can fix
        offdiag_share=share,
        per_module=per_module,
    )
    return check, lam_exact, shuffled


def ekfac_in_one_module(sc: Scoring, fs: FactorSet, exact_block, ref: dict, layout: exact.Layout) -> dict:
    """Localise the error: EK-FAC in one module only, the exact block-diagonal solve everywhere else."""
    ek_solve = sc.factor_solver(fs)
    swap = {}
    for name, (s0, e0) in layout.modules.items():
        row = {}
        for k, lam in sc.lams.items():
            X = exact_block(sc.Q, lam)
            X[s0:e0] = ek_solve(sc.Q, lam)[s0:e0]
            row[k] = spearman_per_query(sc.Gc @ X, ref[k])["mean"]
        swap[name] = row
    return swap


def replicate_trend(model, d: StudyData, sc: Scoring, cv: ExactCurvature, layout, ref: dict, cfg: StudyConfig) -> dict:
    """EK-FAC against the exact block-diagonal solve, and its Λ error, for each extra ``R``."""
    trend = {}
    for R in cfg.replicate_trend:
        fsr = fit(model, d.train_ex, "ekfac", R, cfg)
        got = sc.scores(sc.factor_solver(fsr))
        trend[str(R)] = {k: spearman_per_query(got[k], ref[k])["mean"] for k in sc.lams}
        trend[str(R)]["lambda_rel_error"] = lambda_rel_error(fsr, exact_lambdas(fsr, cv.blk_blocks, layout))
    return trend


def diagnostics(model, d: StudyData, sc: Scoring, cv: ExactCurvature, layout, fs: FactorSet, exact_scores: dict,
                solvers: dict, result: dict, cfg: StudyConfig) -> None:
    """``lambda_check`` (with ``ekfac_in_one_module``), ``controls`` and ``replicate_trend`` into ``result``."""
    ref = exact_scores["exact_block"]
    check, lam_exact, shuffled = lambda_check(fs, cv, layout, cfg)
    result["lambda_check"] = check
    controls = {"ekfac_exact_lambda": sc.scores(sc.factor_solver(fs.with_lambdas(lam_exact))),
                "ekfac_shuffled_lambda": sc.scores(sc.factor_solver(fs.with_lambdas(shuffled)))}
    result["controls"] = sc.compare(ref, controls)
    check["ekfac_in_one_module"] = ekfac_in_one_module(sc, fs, solvers["exact_block"], ref, layout)
    trend = replicate_trend(model, d, sc, cv, layout, ref, cfg)
    trend[str(cfg.replicates)] = {k: v["mean"] for k, v in result["vs_block"]["ekfac"].items()}
    trend[str(cfg.replicates)]["lambda_rel_error"] = check["rel_error_total"]
    result["replicate_trend"] = dict(sorted(trend.items(), key=lambda kv: int(kv[0])))


# --------------------------------------------------------------------------------------------------
# The study


def run_study(config: StudyConfig | None = None, **overrides) -> dict:
    """Run the whole study; returns a JSON-serialisable dict (see the module docstring).

    Keys: ``config``; ``model`` (training curve, losses, mean predictive entropy vs ``log V``, the chain's
    entropy floor, ``D``); ``ggn`` (mean eigenvalue, tokens); ``dampings`` (``{"0.1x": λ}``);
    ``vs_block`` / ``vs_module`` / ``vs_full``: ``{method: {"0.1x": {mean, std, per_query}}}`` for the
    fitted methods and, in ``vs_full``, the exact block-diagonal and module-diagonal solutions too
    (``exact_block`` vs full is the ceiling of any block-diagonal method); ``replicate_trend``:
    ``{R: {"0.1x": mean ρ}}`` of EK-FAC vs exact block; ``lambda_check``; ``controls``; ``timings``.
    """
    cfg = replace(config or StudyConfig(), **overrides)
    timings = {}
    with Timer() as t_all:
        d = sample_data(cfg)
        with Timer() as t:
            model = build_model(cfg)
            info = train(model, cfg, d.train_ex, d.query_ex)
            info["chain_entropy"] = chain_entropy(cfg, d.start, d.trans, d.train_ex)
        timings["train_s"] = t.s
        tms = tracked_modules(model, per_head=True)
        layout = exact.param_layout(tms)
        info.update(D=layout.D, n_blocks=len(layout.blocks), n_modules=len(tms),
                    n_tokens=sum(sum(e.target_mask) for e in d.train_ex))
        with Timer() as t:
            cv = exact_curvature(model, tms, layout, d.train_ex, cfg)
        timings["exact_ggn_s"] = t.s
        with Timer() as t:
            Gc = _grads(model, tms, d.train_ex)  # (N, D) candidates
            Q = _grads(model, tms, d.query_ex).T.contiguous()  # (D, n_q) queries
        timings["grads_s"] = t.s
        sc = Scoring(Gc, Q, {_key(c): c * cv.mean_eig for c in cfg.dampings}, tms)
        solvers = exact_solvers(cv, layout)
        with Timer() as t:
            exact_scores = {name: sc.scores(s) for name, s in solvers.items()}
        timings["exact_solves_s"] = t.s
        with Timer() as t:
            factors = {m: fit(model, d.train_ex, m, cfg.replicates, cfg) for m in cfg.methods}
        timings["fit_s"] = t.s
        approx_scores = {m: sc.scores(sc.factor_solver(fs)) for m, fs in factors.items()}
        result = dict(
            config=_jsonable(asdict(cfg)), model=info,
            ggn=dict(mean_eigenvalue=cv.mean_eig, D=layout.D, n_sequences=len(d.train_ex), full=cv.G is not None),
            dampings=sc.lams, replicates=cfg.replicates,
            vs_block=sc.compare(exact_scores["exact_block"], approx_scores),
        )
        if cv.mod_blocks is not None:
            result["vs_module"] = sc.compare(exact_scores["exact_module"], approx_scores)
        if cv.G is not None:
            result["vs_full"] = sc.compare(exact_scores["exact_full"], {**approx_scores, "exact_block": exact_scores["exact_block"],
                                                                       "exact_module": exact_scores["exact_module"]})
        if cfg.diagnostics and "ekfac" in factors:
            with Timer() as t:
                diagnostics(model, d, sc, cv, layout, factors["ekfac"], exact_scores, solvers, result, cfg)
            timings["diagnostics_s"] = t.s
        timings["total_s"] = t_all.s
    result["timings"] = timings
    return result


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
