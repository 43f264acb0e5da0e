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
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from ..baselines.trak import Projector, featurize, trak_scores
from ..curvature import exact
from ..curvature.fit import FitConfig
from ..curvature.hidden_ggn import hidden_ggn
from ..data.encoding import Encoded
from ..models.adapters import tracked_modules
from . import tinylm
from .timer import Timer


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


def _sets(cfg: LDSConfig) -> tuple[tinylm.TextData, list[Encoded], list[Encoded]]:
    """The text, the training set ``Z`` (the first ``n_train`` sentences, re-indexed) and the queries."""
    data = tinylm.make_data(cfg.countries, 2, 0.1, cfg.seed)
    train = [Encoded(e.input_ids, e.target_mask, index=i) for i, e in enumerate(data.train[: cfg.n_train])]
    clean = [e for e in data.heldout if tinylm.UNK not in e.input_ids]
    queries = random.Random(cfg.seed + 7).sample(clean if len(clean) >= cfg.n_queries else data.heldout, cfg.n_queries)
    return data, train, queries


def _new_model(cfg: LDSConfig, data: tinylm.TextData, seed: int):
    return tinylm.build_model(len(data.vocab), cfg.hidden, cfg.layers, cfg.heads, cfg.intermediate, seed)


@dataclass
class Scores:
    """Each method's scores ``τ (Q, N)`` on the model trained on all of ``Z``, at one absolute damping."""

    scores: dict[str, torch.Tensor]
    lam: float
    D: int
    training: dict


def method_scores(cfg: LDSConfig, data: tinylm.TextData, train: list[Encoded], queries: list[Encoded]) -> Scores:
    """Train on ``Z``; the exact damped GGN solve, EK-FAC (plain and refined basis), K-FAC, GDP and TRAK."""
    N = len(train)
    with Timer() as t:
        model = _new_model(cfg, data, cfg.seed)
        curve = tinylm.train_lm(model, train, cfg.epochs, cfg.lr, cfg.batch_size, cfg.seed, record=True)
    model = model.double().eval()
    tms = tracked_modules(model)
    QG, Qmod = tinylm.example_grads(model, tms, queries)
    CG_, Cmod = tinylm.example_grads(model, tms, train)
    G = hidden_ggn(model, tms, train).full
    lam = cfg.damping * float(torch.diagonal(G).mean())
    scores = {"exact": exact.damped_solve(G, QG.T.contiguous(), lam).T @ CG_.T}
    for name, strat, refine in (("ekfac", "ekfac", 0), ("ekfac_refined", "ekfac", 1), ("kfac", "kfac", 0), ("gdp", "identity", 0)):
        conf = FitConfig(strategy=strat, modules="all", seed=cfg.seed, batch_size=64, refine=refine)
        fs = tinylm.fit(model, train, cfg.replicates, conf, fingerprint="lds")
        U = fs.precondition(Qmod, lam)
        scores[name] = sum(torch.einsum("qoi,coi->qc", U[n], Cmod[n]) for n in fs.modules)
    proj = Projector(exact.param_layout(tms).D, cfg.trak_dim, "rademacher", seed=cfg.seed)
    feats = []
    for mi in range(cfg.trak_models):
        half = random.Random(cfg.seed * 1000 + mi + 1).sample(range(N), N // 2)
        mdl = _new_model(cfg, data, cfg.seed + 500 + mi)
        tinylm.train_lm(mdl, [train[i] for i in half], cfg.epochs, cfg.lr, cfg.batch_size, cfg.seed + 500 + mi, record=False)
        mdl = mdl.double().eval()
        feats.append(featurize(mdl, tracked_modules(mdl), tinylm.batches(train, 64), tinylm.batches(queries, 64), proj))
    scores["trak"] = trak_scores(feats)
    training = dict(final_loss=curve["train_loss"][-1], converged=curve.get("converged"), time_s=t.s)
    return Scores(scores, lam, int(G.shape[0]), training)


def retrained_losses(cfg: LDSConfig, data: tinylm.TextData, train: list[Encoded], queries: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
    """Subset indicators ``masks (K, N)`` and the query losses ``(K, Q)`` of a model retrained on each
    subset from the full model's initialisation and data-order seed."""
    N = len(train)
    g = torch.Generator().manual_seed(cfg.seed + 99)
    k = int(round(cfg.fraction * N))
    masks = torch.zeros(cfg.n_subsets, N)
    losses = torch.zeros(cfg.n_subsets, len(queries), dtype=torch.float64)
    for s in range(cfg.n_subsets):
        idx = torch.randperm(N, generator=g)[:k]
        masks[s, idx] = 1
        mdl = _new_model(cfg, data, cfg.seed)  # same initialisation as the full model
        tinylm.train_lm(mdl, [train[i] for i in sorted(idx.tolist())], cfg.epochs, cfg.lr, cfg.batch_size, cfg.seed, record=False)
        losses[s] = tinylm.sequence_losses(mdl, queries)
    return masks, losses


def run(config: LDSConfig | None = None, progress=None, **overrides) -> dict:
    """The LDS of every method (see the module docstring); a JSON-serialisable dict."""
    cfg = replace(config or LDSConfig(), **overrides)
    log = progress or (lambda m: None)
    with Timer() as total:
        data, train, queries = _sets(cfg)
        sc = method_scores(cfg, data, train, queries)
        log(f"LDS: scores of {len(train)} training sentences for {len(queries)} queries")
        with Timer() as t_sub:
            masks, losses = retrained_losses(cfg, data, train, queries)
        log(f"LDS: retrained {cfg.n_subsets} models in {t_sub.s:.1f}s")
        methods = {name: lds(S, masks, losses) for name, S in sc.scores.items()}
        return dict(
            config=asdict(cfg), n_train=len(train), n_queries=len(queries), damping_lambda=sc.lam, D=sc.D,
            training=sc.training, methods=methods,
            query_loss_spread=float(losses.std(0).mean()),
            cost=dict(subset_training_s=t_sub.s, per_model_s=t_sub.s / cfg.n_subsets, total_s=total.s),
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
