"""Linear datamodeling score (LDS, Park et al. 2023): a counterfactual check beyond the paper.

The paper's scalability study (§5.1) only compares methods with a CG solve of the same influence
formula; it never asks whether the scores predict what retraining does. The LDS does:

1. train the model on the whole training set ``Z`` (``n_train`` corpus sentences) and compute each
   method's scores ``τ(q, z)`` for every ``z ∈ Z`` and every query ``q`` (held-out sentences);
2. draw ``n_subsets`` random subsets ``S_k ⊂ Z`` of ``fraction · |Z|`` sentences and retrain the model on
   each from the **same initialisation and data-order seed** (less training noise), for the same number
   of epochs, then measure the query losses ``m(q; θ_{S_k})`` (summed token loss);
3. the datamodel prediction of a subset is ``g_k(q) = Σ_{z ∈ S_k} τ(q, z)`` (positive scores are
   proponents: they lower the loss), so the LDS of a query is the Spearman correlation over subsets
   between ``g_k(q)`` and ``−m(q; θ_{S_k})``; it is averaged over queries (mean ± std).

Methods: EK-FAC, K-FAC, GDP (fitted on the training set, same absolute damping ``damping · trace(G)/D``),
TRAK (its own ensemble on random halves) and, as the reference of the influence formula itself, the
exact damped GGN solve (dense). The cost (retraining ``n_subsets`` models) is reported.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from ..baselines.trak import Projector, featurize, trak_scores
from ..curvature import exact
from ..models.adapters import tracked_modules
from . import scalability as sc


@dataclass
class LDSConfig:
    countries: int = 12
    n_train: int = 160
    n_queries: int = 8
    hidden: int = 8
    layers: int = 2
    heads: int = 2
    intermediate: int = 32
    epochs: int = 20
    lr: float = 1e-2
    batch_size: int = 16
    n_subsets: int = 32
    fraction: float = 0.5
    damping: float = 0.1  # multiple of trace(G)/D
    replicates: int = 4
    trak_models: int = 4
    trak_dim: int = 128
    seed: int = 0


TINY = LDSConfig(n_train=60, n_queries=3, epochs=8, n_subsets=8, trak_models=1, trak_dim=32, replicates=2)


def lds(scores: torch.Tensor, masks: torch.Tensor, losses: torch.Tensor) -> dict:
    """LDS from ``scores (Q, N)``, subset indicators ``masks (K, N)`` and retrained query losses ``(K, Q)``.

    Per query: Spearman over the ``K`` subsets of ``masks @ scores[q]`` against ``−losses[:, q]``.
    """
    from scipy.stats import spearmanr

    pred = masks.double() @ scores.double().T  # (K, Q)
    vals = []
    for q in range(scores.shape[0]):
        a, b = pred[:, q].numpy(), (-losses[:, q].double()).numpy()
        vals.append(0.0 if np.std(a) == 0 or np.std(b) == 0 else float(spearmanr(a, b).statistic))
    return dict(mean=float(np.mean(vals)), std=float(np.std(vals)), per_query=vals)


def run(config: LDSConfig | None = None, progress=None, **overrides) -> dict:
    cfg = replace(config or LDSConfig(), **overrides)
    log = progress or (lambda m: None)
    T0 = time.perf_counter()
    data = sc.make_data(cfg.countries, 2, 0.1, cfg.seed)
    train = [sc.Encoded(e.input_ids, e.target_mask, index=i) for i, e in enumerate(data.train[: cfg.n_train])]
    clean = [e for e in data.heldout if 3 not in e.input_ids]
    queries = random.Random(cfg.seed + 7).sample(clean if len(clean) >= cfg.n_queries else data.heldout, cfg.n_queries)
    N = len(train)

    def new_model(seed):
        return sc.build_model(len(data.vocab), cfg.hidden, cfg.layers, cfg.heads, cfg.intermediate, seed)

    t = time.perf_counter()
    model = new_model(cfg.seed)
    curve = sc.train_lm(model, train, cfg.epochs, cfg.lr, cfg.batch_size, cfg.seed, record=True)
    t_train = time.perf_counter() - t
    model = model.double().eval()
    tms = tracked_modules(model)
    QG, Qmod = sc.flat_grads(model, tms, queries)
    CG_, Cmod = sc.flat_grads(model, tms, train)
    G = sc.dense_ggn(model, tms, train)
    lam = cfg.damping * float(torch.diagonal(G).mean())
    scores = {"exact": exact.damped_solve(G, QG.T.contiguous(), lam).T @ CG_.T}
    for name, strat, refine in (("ekfac", "ekfac", 0), ("ekfac_refined", "ekfac", 1), ("kfac", "kfac", 0), ("gdp", "identity", 0)):
        fs = sc.fit(model, tms, train, strat, "all", cfg.replicates, cfg.seed, refine=refine)
        U = fs.precondition(Qmod, lam)
        scores[name] = sum(torch.einsum("qoi,coi->qc", U[n], Cmod[n]) for n in fs.modules)
    proj = Projector(exact.param_layout(tms).D, cfg.trak_dim, "rademacher", seed=cfg.seed)
    feats = []
    for mi in range(cfg.trak_models):
        half = random.Random(cfg.seed * 1000 + mi + 1).sample(range(N), N // 2)
        mdl = new_model(cfg.seed + 500 + mi)
        sc.train_lm(mdl, [train[i] for i in half], cfg.epochs, cfg.lr, cfg.batch_size, cfg.seed + 500 + mi, record=False)
        mdl = mdl.double().eval()
        feats.append(featurize(mdl, tracked_modules(mdl), sc._batches(train, 64), sc._batches(queries, 64), proj))
    scores["trak"] = trak_scores(feats)
    log(f"LDS: scores of {N} training sentences for {len(queries)} queries")

    # retraining on random subsets
    t = time.perf_counter()
    g = torch.Generator().manual_seed(cfg.seed + 99)
    k = int(round(cfg.fraction * N))
    masks = torch.zeros(cfg.n_subsets, N)
    losses = torch.zeros(cfg.n_subsets, len(queries), dtype=torch.float64)
    for s in range(cfg.n_subsets):
        idx = torch.randperm(N, generator=g)[:k]
        masks[s, idx] = 1
        mdl = new_model(cfg.seed)  # same initialisation as the full model
        sc.train_lm(mdl, [train[i] for i in sorted(idx.tolist())], cfg.epochs, cfg.lr, cfg.batch_size, cfg.seed, record=False)
        losses[s] = sc.sequence_losses(mdl, queries)
    t_sub = time.perf_counter() - t
    log(f"LDS: retrained {cfg.n_subsets} models in {t_sub:.1f}s")
    methods = {name: lds(S, masks, losses) for name, S in scores.items()}
    return dict(
        config=asdict(cfg), n_train=N, n_queries=len(queries), damping_lambda=lam, D=int(G.shape[0]),
        training=dict(final_loss=curve["train_loss"][-1], converged=curve.get("converged"), time_s=t_train),
        methods=methods,
        query_loss_spread=float(losses.std(0).mean()),
        cost=dict(subset_training_s=t_sub, per_model_s=t_sub / cfg.n_subsets, total_s=time.perf_counter() - T0),
    )


_LABEL = {"exact": "exact damped GGN (dense)", "ekfac": "EK-FAC", "ekfac_refined": "EK-FAC, refined basis", "kfac": "K-FAC", "gdp": "GDP", "trak": "TRAK"}


def markdown_table(res: dict) -> str:
    c = res["config"]
    lines = [
        f"### Linear datamodeling score ({res['n_queries']} queries, {c['n_subsets']} retrained models on random "
        f"{c['fraction']:.0%} subsets of {res['n_train']} sentences, damping {c['damping']:g}× mean eigenvalue)",
        "",
        "| method | LDS (Spearman, mean ± std over queries) |",
        "|---|---|",
    ]
    for name, r in res["methods"].items():
        lines.append(f"| {_LABEL.get(name, name)} | {r['mean']:.3f} ± {r['std']:.3f} |")
    lines.append("")
    lines.append(
        f"Cost: {res['cost']['subset_training_s']:.1f} s to retrain {c['n_subsets']} models "
        f"({res['cost']['per_model_s']:.2f} s each); total {res['cost']['total_s']:.1f} s."
    )
    return "\n".join(lines)
