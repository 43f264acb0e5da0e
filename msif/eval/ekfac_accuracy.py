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

:func:`run_study` returns a JSON-serialisable dict; ``benchmarks/ekfac_accuracy.py`` prints it as a
table, ``tests/test_ekfac_accuracy.py`` checks the acceptance thresholds on it.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from scipy.stats import spearmanr
from torch.func import jacrev

from ..curvature import exact
from ..curvature.factors import FactorSet
from ..curvature.fit import FitConfig, fit_factors
from ..data.encoding import Batch, Encoded, collate
from ..models.adapters import tracked_modules
from ..objectives import data_targets, model_logits, summed_loss

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
# Data and model


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
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    mc = GPTNeoXConfig(
        hidden_size=cfg.hidden, num_attention_heads=cfg.heads, num_hidden_layers=cfg.layers,
        intermediate_size=cfg.intermediate, vocab_size=cfg.vocab, max_position_embeddings=max(64, cfg.max_len),
        pad_token_id=0, bos_token_id=0, eos_token_id=0, hidden_dropout=0.0, attention_dropout=0.0,
        attn_implementation="sdpa",  # float64 softmax throughout (eager NeoX attention runs in float32)
    )
    torch.manual_seed(cfg.seed)
    model = GPTNeoXForCausalLM(mc).double()
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        model.config._attn_implementation = "sdpa"
    return model


def _token_loss(model, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over counted positions, and their number."""
    loss = summed_loss(model_logits(model, batch), data_targets(batch, "lm")).sum()
    return loss, int(batch.target_mask.sum())


def _mean_token_loss(model, batches: list[Batch]) -> float:
    with torch.no_grad():
        tot = [_token_loss(model, b) for b in batches]
    return float(sum(l for l, _ in tot)) / sum(n for _, n in tot)


def _mean_entropy(model, batches: list[Batch]) -> float:
    tot, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
            logp = torch.log_softmax(logits, -1)
            ent = -(logp.exp() * logp).sum(-1)
            tot += float(ent[b.target_mask].sum())
            n += int(b.target_mask.sum())
    return tot / n


def train(model, cfg: StudyConfig, train_ex: list[Encoded], held_ex: list[Encoded]) -> dict:
    """Adam on the mean token loss of minibatches of the training sequences. Returns the loss curve."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    full = [collate(train_ex[i : i + 100]) for i in range(0, len(train_ex), 100)]
    held = [collate(held_ex)]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.train_steps, eta_min=cfg.lr * 0.05)
    model.train()
    curve = [(0, _mean_token_loss(model, full))]
    every = max(1, cfg.train_steps // 8)
    for step in range(1, cfg.train_steps + 1):
        idx = torch.randperm(len(train_ex), generator=g)[: cfg.train_batch].tolist()
        loss, n = _token_loss(model, collate([train_ex[i] for i in idx]))
        opt.zero_grad()
        (loss / n).backward()
        opt.step()
        sched.step()
        if step % every == 0 or step == cfg.train_steps:
            curve.append((step, _mean_token_loss(model, full)))
    model.eval()
    return dict(
        loss_curve=curve,
        train_loss_start=curve[0][1],
        train_loss_end=curve[-1][1],
        heldout_loss=_mean_token_loss(model, held),
        mean_entropy=_mean_entropy(model, full),
        log_vocab=math.log(cfg.vocab),
    )


# --------------------------------------------------------------------------------------------------
# Exact curvature


def exact_ggn_blocks(model, tms, examples: list[Encoded], ranges: list[tuple[int, int]] | None, chunk_rows: int = 6000):
    """The exact GGN ``G = (1/N) Σ_n Σ_t J_tᵀ (diag p_t − p_t p_tᵀ) J_t`` (objective "lm").

    Uses the exact square-root factor ``diag p − p pᵀ = B Bᵀ`` with ``B = diag(√p) − p √pᵀ``: the rows
    ``Bᵀ J_t`` are stacked and ``G = FᵀF / N``. One sequence at a time (its Jacobian rows only touch
    itself). ``ranges=None`` → the full ``(D, D)`` matrix; otherwise a list of the diagonal blocks
    ``G[s:e, s:e]`` for each ``(s, e)`` (cheap: only block-sized products), plus ``diag(G)``.
    """
    with exact._prepared(model, tms) as f:
        D = f.theta0.numel()
        G = torch.zeros(D, D, dtype=torch.float64) if ranges is None else None
        blocks = None if ranges is None else [torch.zeros(e - s, e - s, dtype=torch.float64) for s, e in ranges]
        diag = torch.zeros(D, dtype=torch.float64)
        pending: list[torch.Tensor] = []
        n_rows = 0

        def flush():
            nonlocal pending, n_rows
            if not pending:
                return
            F = torch.cat(pending)
            pending, n_rows = [], 0
            diag.add_((F * F).sum(0))
            if G is not None:
                G.addmm_(F.T, F)
            else:
                for (s, e), Gb in zip(ranges, blocks):
                    Fb = F[:, s:e]
                    Gb.addmm_(Fb.T, Fb)

        for e in examples:
            b = collate([e])
            _, mask = exact._targets(b, "lm")
            if not bool(mask.any()):
                continue
            sel = lambda th: f.logits(th, b)[mask]  # noqa: E731  (P, V)
            with torch.no_grad():
                p = torch.softmax(sel(f.theta0), dim=-1)
            J = jacrev(sel)(f.theta0).detach()  # (P, V, D)
            sq = p.sqrt()
            Bm = torch.diag_embed(sq) - p.unsqueeze(-1) * sq.unsqueeze(-2)  # (P, V, V): B[v, k]
            F = torch.einsum("pvk,pvd->pkd", Bm, J).reshape(-1, D)
            pending.append(F)
            n_rows += F.shape[0]
            if n_rows >= chunk_rows:
                flush()
        flush()
        N = len(examples)
        diag /= N
        if G is not None:
            G /= N
            return 0.5 * (G + G.T), diag
        return [0.5 * (Gb + Gb.T) / N for Gb in blocks], diag


def _grads(model, tms, examples: list[Encoded], chunk: int = 8) -> torch.Tensor:
    """Exact per-sequence gradients of the summed LM loss (data labels): ``(n, D)`` float64."""
    return torch.cat([exact.flat_example_grads(model, tms, collate(examples[i : i + chunk]), "lm")
                      for i in range(0, len(examples), chunk)])


def _blockdiag_solver(blocks: list[torch.Tensor], ranges):
    eig = [torch.linalg.eigh(Gb) for Gb in blocks]

    def solve(Q: torch.Tensor, lam: float) -> torch.Tensor:  # Q (D, k)
        X = torch.empty_like(Q)
        for (s, e), (ev, U) in zip(ranges, eig):
            X[s:e] = U @ ((U.T @ Q[s:e]) / (ev + lam).unsqueeze(-1))
        return X

    return solve


def _full_solver(G: torch.Tensor):
    def solve(Q: torch.Tensor, lam: float) -> torch.Tensor:
        return exact.damped_solve(G, Q, lam)

    return solve


def _to_modules(vecs: torch.Tensor, tms, layout) -> dict[str, torch.Tensor]:
    """``(k, D)`` → module name → ``(k, out, in_dim)``."""
    out = {}
    for tm in tms:
        o = layout.offsets[tm.name]
        out[tm.name] = vecs[:, o : o + tm.out_features * tm.in_dim].reshape(-1, tm.out_features, tm.in_dim)
    return out


def _from_modules(mats: dict[str, torch.Tensor], tms) -> torch.Tensor:
    return torch.cat([mats[tm.name].reshape(mats[tm.name].shape[0], -1) for tm in tms], dim=1)


def _factor_solver(fs: FactorSet, tms, layout):
    def solve(Q: torch.Tensor, lam: float) -> torch.Tensor:  # Q (D, k)
        return _from_modules(fs.precondition(_to_modules(Q.T.contiguous(), tms, layout), float(lam)), tms).T

    return solve


# --------------------------------------------------------------------------------------------------
# Fitting


def _replicated_batches(train_ex: list[Encoded], R: int, batch_size: int) -> list[Batch]:
    N = len(train_ex)
    reps = [Encoded(e.input_ids, e.target_mask, index=r * N + i) for r in range(R) for i, e in enumerate(train_ex)]
    return [collate(reps[i : i + batch_size]) for i in range(0, len(reps), batch_size)]


def fit(model, train_ex: list[Encoded], strategy: str, R: int, cfg: StudyConfig, seed: int | None = None) -> FactorSet:
    """Factors fitted with sampled labels on ``R`` copies of every training sequence."""
    batches = _replicated_batches(train_ex, R, cfg.fit_batch) if strategy != "identity" else [collate(train_ex[:1])]
    conf = FitConfig(strategy=strategy, labels="sampled", seed=cfg.seed if seed is None else seed)
    return fit_factors(model, batches, conf, fingerprint="ekfac-accuracy-study")


def _with_lambda(fs: FactorSet, lam: dict[str, torch.Tensor]) -> FactorSet:
    """A copy of EK-FAC factors whose ``Λ`` is ``lam[block]`` (same eigenbases)."""
    new = copy.copy(fs)
    new.stats = {b: copy.copy(st) for b, st in fs.stats.items()}
    for b, x in lam.items():
        new.stats[b].lambda_sum = x.double() * fs.n_examples_lambda
    return new


# --------------------------------------------------------------------------------------------------
# Scores and agreement


def spearman_per_query(a: torch.Tensor, b: torch.Tensor) -> dict:
    """``a, b (n_candidates, n_queries)`` → mean ± std over queries of Spearman's ρ per query column."""
    rhos = []
    for j in range(a.shape[1]):
        r = spearmanr(a[:, j].numpy(), b[:, j].numpy()).statistic
        rhos.append(float(r) if r == r else 0.0)
    return dict(mean=float(np.mean(rhos)), std=float(np.std(rhos)), per_query=rhos)


def _key(c: float) -> str:
    return f"{c:g}x"


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
    t_all = time.perf_counter()
    timings = {}
    g = torch.Generator().manual_seed(cfg.seed)
    start, trans = make_chain(cfg, g)
    train_ex = sample_sequences(cfg, start, trans, cfg.n_train, g)
    query_ex = sample_sequences(cfg, start, trans, cfg.n_queries, g, first_index=10**6)

    t = time.perf_counter()
    model = build_model(cfg)
    info = train(model, cfg, train_ex, query_ex)
    info["chain_entropy"] = chain_entropy(cfg, start, trans, train_ex)
    timings["train_s"] = time.perf_counter() - t

    tms = tracked_modules(model, per_head=True)
    layout = exact.param_layout(tms)
    D = layout.D
    info.update(D=D, n_blocks=len(layout.blocks), n_modules=len(tms),
                n_tokens=sum(sum(e.target_mask) for e in train_ex))

    # exact GGN: full on request, else only the diagonal blocks (module-level ones contain the per-head ones)
    t = time.perf_counter()
    mod_ranges = list(layout.modules.values())
    blk_ranges = list(layout.blocks.values())
    G, mod_blocks = None, None
    if cfg.full:
        G, diag = exact_ggn_blocks(model, tms, train_ex, None)
        mod_blocks = [G[s:e, s:e].clone() for s, e in mod_ranges]
        blk_blocks = [G[s:e, s:e].clone() for s, e in blk_ranges]
    elif cfg.module_level:
        mod_blocks, diag = exact_ggn_blocks(model, tms, train_ex, mod_ranges)
        blk_blocks = []
        for s, e in blk_ranges:
            (ms, _), Gm = next(((ms, me), Gm) for (ms, me), Gm in zip(mod_ranges, mod_blocks) if ms <= s and e <= me)
            blk_blocks.append(Gm[s - ms : e - ms, s - ms : e - ms].clone())
    else:
        blk_blocks, diag = exact_ggn_blocks(model, tms, train_ex, blk_ranges)
    mean_eig = float(diag.sum()) / D
    timings["exact_ggn_s"] = time.perf_counter() - t

    t = time.perf_counter()
    Gc = _grads(model, tms, train_ex)  # (N, D) candidates
    Q = _grads(model, tms, query_ex).T.contiguous()  # (D, n_q) queries
    timings["grads_s"] = time.perf_counter() - t

    lams = {_key(c): c * mean_eig for c in cfg.dampings}
    solvers = {"exact_block": _blockdiag_solver(blk_blocks, blk_ranges)}
    if mod_blocks is not None:
        solvers["exact_module"] = _blockdiag_solver(mod_blocks, mod_ranges)
    if G is not None:
        solvers["exact_full"] = _full_solver(G)

    def scores(solve) -> dict[str, torch.Tensor]:
        return {k: Gc @ solve(Q, lam) for k, lam in lams.items()}

    t = time.perf_counter()
    exact_scores = {name: scores(s) for name, s in solvers.items()}
    timings["exact_solves_s"] = time.perf_counter() - t

    t = time.perf_counter()
    factors = {m: fit(model, train_ex, m, cfg.replicates, cfg) for m in cfg.methods}
    timings["fit_s"] = time.perf_counter() - t
    approx_scores = {m: scores(_factor_solver(fs, tms, layout)) for m, fs in factors.items()}

    def compare(ref: str, which: dict) -> dict:
        return {m: {k: spearman_per_query(sc[k], exact_scores[ref][k]) for k in lams} for m, sc in which.items()}

    result = dict(
        config=_jsonable(asdict(cfg)),
        model=info,
        ggn=dict(mean_eigenvalue=mean_eig, D=D, n_sequences=len(train_ex), full=G is not None),
        dampings=lams,
        replicates=cfg.replicates,
        vs_block=compare("exact_block", approx_scores),
    )
    if mod_blocks is not None:
        result["vs_module"] = compare("exact_module", approx_scores)
    if G is not None:
        result["vs_full"] = compare("exact_full", {**approx_scores, "exact_block": exact_scores["exact_block"],
                                                   "exact_module": exact_scores["exact_module"]})

    if cfg.diagnostics and "ekfac" in factors:
        t = time.perf_counter()
        fs = factors["ekfac"]
        lam_exact, rel, corr, shuffled = {}, [], [], {}
        tot_num = tot_den = 0.0
        gsh = torch.Generator().manual_seed(cfg.seed + 7)
        for (bname, blk), Gb in zip(layout.blocks.items(), blk_blocks):
            b = fs.blocks[bname]
            K = torch.kron(fs.QS[bname], fs.QA[b.module])
            le = torch.einsum("ij,ik,kj->j", K, Gb, K).reshape(b.out_dim, -1)  # diag(Kᵀ G_b K)
            lf = fs.lambdas(bname)
            lam_exact[bname] = le
            tot_num += float(((lf - le) ** 2).sum())
            tot_den += float((le**2).sum())
            rel.append(float((lf - le).norm() / le.norm()))
            corr.append(float(spearmanr(lf.reshape(-1).numpy(), le.reshape(-1).numpy()).statistic))
            shuffled[bname] = lf.reshape(-1)[torch.randperm(lf.numel(), generator=gsh)].reshape(lf.shape)
        oracle = _with_lambda(fs, lam_exact)
        shuf = _with_lambda(fs, shuffled)
        share, per_module = _offdiag_share(fs, layout, blk_blocks)
        result["lambda_check"] = dict(
            rel_error_total=math.sqrt(tot_num / tot_den),
            rel_error_per_block_median=float(np.median(rel)),
            rel_error_per_block_max=float(np.max(rel)),
            spearman_per_block_min=float(np.min(corr)),
            spearman_per_block_median=float(np.median(corr)),
            # share of G_block's Frobenius norm² off the Kronecker eigenbasis diagonal: what no Λ can fix
            offdiag_share=share,
            per_module=per_module,
        )
        controls = {"ekfac_exact_lambda": scores(_factor_solver(oracle, tms, layout)),
                    "ekfac_shuffled_lambda": scores(_factor_solver(shuf, tms, layout))}
        result["controls"] = compare("exact_block", controls)
        # localise the error: EK-FAC in one module only, the exact block-diagonal solve everywhere else
        ek_solve, ex_solve = _factor_solver(fs, tms, layout), solvers["exact_block"]
        swap = {}
        for name, (s0, e0) in layout.modules.items():
            sc = {}
            for k, lam in lams.items():
                X = ex_solve(Q, lam)
                X[s0:e0] = ek_solve(Q, lam)[s0:e0]
                sc[k] = spearman_per_query(Gc @ X, exact_scores["exact_block"][k])["mean"]
            swap[name] = sc
        result["lambda_check"]["ekfac_in_one_module"] = swap
        trend = {}
        for R in cfg.replicate_trend:
            fsr = fit(model, train_ex, "ekfac", R, cfg)
            sc = scores(_factor_solver(fsr, tms, layout))
            trend[str(R)] = {k: spearman_per_query(sc[k], exact_scores["exact_block"][k])["mean"] for k in lams}
            trend[str(R)]["lambda_rel_error"] = _lambda_rel_error(fsr, layout, blk_blocks)
        trend[str(cfg.replicates)] = {k: v["mean"] for k, v in result["vs_block"]["ekfac"].items()}
        trend[str(cfg.replicates)]["lambda_rel_error"] = result["lambda_check"]["rel_error_total"]
        result["replicate_trend"] = dict(sorted(trend.items(), key=lambda kv: int(kv[0])))
        timings["diagnostics_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_all
    result["timings"] = timings
    return result


def _lambda_rel_error(fs: FactorSet, layout, blk_blocks) -> float:
    """``‖Λ_fit − Λ_exact‖_F / ‖Λ_exact‖_F`` over all blocks, ``Λ_exact = diag(Kᵀ G_block K)`` in the
    fit's own eigenbasis ``K = Q_S ⊗ Q_A``. Sampling noise shrinks like ``1/√(R·N)``; a bias would not."""
    num = den = 0.0
    for (bname, _), Gb in zip(layout.blocks.items(), blk_blocks):
        b = fs.blocks[bname]
        K = torch.kron(fs.QS[bname], fs.QA[b.module])
        le = torch.einsum("ij,ik,kj->j", K, Gb, K).reshape(b.out_dim, -1)
        num += float(((fs.lambdas(bname) - le) ** 2).sum())
        den += float((le**2).sum())
    return math.sqrt(num / den)


def _offdiag_share(fs: FactorSet, layout, blk_blocks) -> tuple[float, dict[str, float]]:
    """Share of ``‖G_block‖²_F`` off the diagonal of the Kronecker eigenbasis ``Q_S ⊗ Q_A``: the part of
    the block no choice of ``Λ`` can represent. Overall and per module."""
    on, tot = {}, {}
    for (bname, _), Gb in zip(layout.blocks.items(), blk_blocks):
        b = fs.blocks[bname]
        K = torch.kron(fs.QS[bname], fs.QA[b.module])
        R = K.T @ Gb @ K
        tot[b.module] = tot.get(b.module, 0.0) + float((R**2).sum())
        on[b.module] = on.get(b.module, 0.0) + float((torch.diagonal(R) ** 2).sum())
    return 1.0 - sum(on.values()) / sum(tot.values()), {m: 1.0 - on[m] / tot[m] for m in tot}


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
