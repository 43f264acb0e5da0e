"""Fact tracing on the bundled world (paper §5.3): which pre-training documents taught the fine-tuned
model a fact?

Every test fact (a held-out fact the QA fine-tune answers correctly, :attr:`World.test_facts`) is a
query ``m = −log p(answer | qa_prompt(question))`` on the fine-tuned model; its gold documents are
the pre-training documents that state the fact (:meth:`World.sources`). Each method scores a query's
candidates; MRR and Recall@k (both variants, :mod:`msif.eval.metrics`) measure how high the gold
documents rank. ``FactTracingConfig.world`` picks the world variant: ``"standard"``, or ``"hard"``
(:mod:`msif.worldfacts.hard`: most sources state their fact without the question's words, and
negations and near-misses that share them are the hard negatives); the results name it.

Methods (larger score = ranked higher):

* ``ms-if``  multi-stage influence ``∇m(θ_ft)ᵀ (G_ft+λ)⁻¹ (G_pt+λ)⁻¹ ∇ℓ(z, θ_pt)`` (one λ for both);
* ``ss-if``  single-stage ``∇m(θ_ft)ᵀ (G_ft+λ)⁻¹ ∇ℓ(z, θ_ft)`` (QA only: needs an LM fine-tune);
* ``gdp``    gradient dot product ``∇m(θ_ft)ᵀ ∇ℓ(z, θ_pt)``;
* ``repsim`` cosine of mean last-layer hidden states (query on θ_ft, candidate on θ_pt);
* ``bm25``   BM25 of the query text (question + answer) against the document;
* ``embedding`` cosine of all-MiniLM-L6-v2 embeddings (query text vs document);
* ``random`` seeded random scores (a negative control; ``chance`` is its analytic expectation).

Candidates, reported separately:

* ``knn``  — the paper's pipeline: the ``k_candidates`` embedding nearest neighbours of the query text
  over the whole corpus. The recall of the gold documents in this set caps every reranker and is
  reported (``candidate_recall``). ``embedding`` here is the retrieval order itself.
* ``pool`` — a fixed rerank pool per query: every gold document, the top ``pool_bm25`` BM25 hits,
  then random documents up to ``pool_size`` (shuffled).

Classification: the world's continent classifier (a new head on the pre-trained backbone). Queries are
the held-out continent facts the classifier gets right, measured at their (true = predicted) label;
gold = the sources of the fact. Only ``ms-if``, ``gdp``, ``repsim`` (and the model-free ``bm25``,
``embedding``, ``random``) apply; its curvature ``G_ft`` is fitted with the classification loss.

Trials (mean ± sample std over them): trial ``t`` draws its query subset (``n_queries`` of the test
facts, without replacement; all of them when there are fewer), its random pool documents and random
control scores with seed ``seed + t``, and fits all curvature factors with label-sampling seed ``t``.

Dampings are absolute (the same λ for ``G_pt`` and ``G_ft``); the report also gives each λ as a
multiple of each factor set's mean eigenvalue.

Cost: a candidate's gradient does not depend on the query or the damping, so per (task, trial) and
chunk of queries every document any of them needs goes through θ_pt once (and through θ_ft once, for
SS-IF) in :meth:`Attributor.score_encoded`; the query vectors of every (query, damping) are stacked
and each is contracted with its own query's candidates only (``subsets`` of
:func:`msif.influence.scoring.score_batches`). Factors and the embedding index are cached under
``cache_dir``. The stages of :func:`run_fact_tracing` are the functions below, in the order they run.

:func:`run_fact_tracing` returns a JSON-serialisable dict; :func:`write_outputs` writes it as JSON, a
markdown table and a Figure-3-style plot.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..curvature.damping import Damping
from .fact_tracing_report import SETTINGS, markdown, plot, write_outputs
from .fact_tracing_inputs import (CandidateSets, FactQuery, Queries, Retrieval, Setup, candidate_sets, factor_sets,
                                  fit_or_load, log, queries, retrieval, setup)
from .metrics import chance_mrr, chance_recall_any, chance_recall_frac, query_metrics, summarize

__all__ = ["FactTracingConfig", "quick_config", "run_fact_tracing", "fit_or_load", "markdown", "plot", "write_outputs"]

INFLUENCE_METHODS = ("ms-if", "ss-if", "gdp")
QA_METHODS = ("ms-if", "ss-if", "gdp", "repsim", "bm25", "embedding", "random")
CLS_METHODS = ("ms-if", "gdp", "repsim", "bm25", "embedding", "random")
DAMPED = ("ms-if", "ss-if")
DEFAULT_DAMPINGS = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


@dataclass
class FactTracingConfig:
    """Settings of the benchmark (defaults: the full run; :func:`quick_config` for the test suite)."""

    size: str = "full"  # world size preset
    world_seed: int = 0
    world: str = "standard"  # world variant: "standard" or "hard" (msif.worldfacts.hard)
    trials: int = 3
    n_queries: int = 150  # per trial (all test facts when there are fewer)
    seed: int = 0
    dampings: tuple = DEFAULT_DAMPINGS  # absolute floats, or "0.1x" strings (multiples of each mean eigenvalue)
    k_candidates: int = 100  # knn setting
    pool_size: int = 100  # pool setting
    pool_bm25: int = 20
    k: int = 10  # Recall@k
    classification: bool = True
    batch_size: int = 32  # candidates per forward/backward
    fit_batch_size: int = 16
    max_fit_examples: int | None = None  # per factor fit (None: all)
    refine: int = 0  # EK-FAC basis-refinement passes of every factor fit (FitConfig.refine)
    refine_query: int = 0  # CG steps per stage refining every MS-IF / SS-IF query vector on the full GGN (--refine-query)
    gvp_examples: int = 64  # examples of each stage's data in that GGN
    threads: int = 2
    max_vector_bytes: float = 2e9  # stacked query vectors held at once (queries are chunked to fit)
    quick: bool = False


def quick_config(**overrides) -> FactTracingConfig:
    """The quick mode: the tiny world, smaller candidate sets (minutes on two CPU cores)."""
    base = FactTracingConfig(size="tiny", trials=2, n_queries=150, k_candidates=50, pool_size=50, pool_bm25=10,
                             quick=True)
    return replace(base, **overrides)


def parse_dampings(values) -> list:
    """The config's dampings as written in the results (floats, or ``"0.1x"`` strings): one kind only."""
    parsed = [Damping.parse(x) for x in values]
    if len({d.relative for d in parsed}) > 1:
        raise ValueError("give either absolute dampings or relative ones ('0.1x'), not both")
    return [d.to_json() for d in parsed]


# ------------------------------------------------------------------------------------------ stages


@dataclass
class _Influence:
    """MS-IF / GDP scores (θ_pt pass) and SS-IF scores (θ_ft pass) per (task, trial, query index):
    ``(variants, len(rows[key]))`` over the query's candidate rows ``rows[key]`` (sorted), variants in
    the order of the dampings (then GDP, for θ_pt)."""

    rows: dict[tuple, np.ndarray] = field(default_factory=dict)
    pt: dict[tuple, np.ndarray] = field(default_factory=dict)
    ft: dict[tuple, np.ndarray] = field(default_factory=dict)
    attributors: dict[tuple, object] = field(default_factory=dict)
    passes: dict[str, int] = field(default_factory=lambda: {"pt": 0, "ft": 0})


def _stacked(per_variant: list[dict], Q: int) -> dict:
    """``[module → (Q, out, in_dim)]`` per variant → module → ``(Q·V, out, in_dim)``, query-major
    (query ``j``'s variants are rows ``j·V … j·V + V − 1``)."""
    return {n: torch.stack([v[n] for v in per_variant], 1).reshape(Q * len(per_variant), *per_variant[0][n].shape[1:])
            for n in per_variant[0]}


def _score_stage(att, U: dict, method: str, rows_of: list[np.ndarray], n_variants: int, encoded: list) -> list[np.ndarray]:
    """Each query's ``(variants, len(rows))`` scores over its own rows, from one candidate pass over the
    union of the rows, with query ``j``'s variants contracted with its rows only."""
    cols = np.unique(np.concatenate(rows_of))
    subsets = [r.tolist() for r in rows_of for _ in range(n_variants)]
    res = att.score_encoded(U, [encoded[c] for c in cols.tolist()], method, subsets=subsets)
    S = res.scores.cpu().numpy()
    return [S[j * n_variants : (j + 1) * n_variants, np.searchsorted(cols, r)] for j, r in enumerate(rows_of)]


def _attributor(s: Setup, task: str, t: int, fits: dict):
    from ..influence.attribute import Attributor

    m, w, cfg = s.models, s.world, s.cfg
    return Attributor(m["pt"], m["ft"] if task == "qa" else m["clf"], m["tok"], fits[("pt", t)],
                      fits[("ft" if task == "qa" else "cls", t)], batch_size=cfg.batch_size, refine_query=cfg.refine_query,
                      gvp_examples=cfg.gvp_examples, pretrained_data=w.corpus_path,
                      finetuned_data=w.qa_finetune_path if task == "qa" else w.cls_finetune_path)


def _influence(s: Setup, q: Queries, c: CandidateSets, fits: dict) -> _Influence:
    """Per (task, trial), in chunks of queries whose stacked vectors fit ``max_vector_bytes``: one θ_pt
    pass with [MS-IF at each damping…, GDP] per query, one θ_ft pass (QA) with [SS-IF at each damping…]."""
    from ..influence.attribute import Query

    out, T, lams = _Influence(), s.timings, s.dampings
    encoded, names = None, None
    for task, qs in q.tasks.items():
        for t in s.trials:
            with T("query vectors"):
                att = out.attributors[(task, t)] = _attributor(s, task, t, fits)
                if names is None:
                    names = [tm.name for tm in att.shared]
                    encoded = att.encode_candidates(s.texts, range(s.n_docs))
                elif [tm.name for tm in att.shared] != names:
                    raise RuntimeError("the QA and classification models track different modules")
            P = sum(tm.out_features * tm.in_dim for tm in att.shared)
            chunk = max(1, int(s.cfg.max_vector_bytes // ((len(lams) + 1) * P * 4)))
            sel_all = q.trial_q[task][t]
            for c0 in range(0, len(sel_all), chunk):
                sel = sel_all[c0 : c0 + chunk]
                keys = [(task, t, qi) for qi in sel]
                rows_of = [np.unique(np.concatenate([c.rows[(task, st, t, qi)] for st in SETTINGS])) for qi in sel]
                out.rows.update(zip(keys, rows_of))
                with T("query vectors"):
                    prepared = att.prepare([Query(prompt=qs[i].prompt, answer=qs[i].answer, label=qs[i].label,
                                                  id=qs[i].fact_id) for i in sel])
                    grads = att.query_gradients(prepared, factored=True)
                    U_pt = _stacked([att.query_vectors(grads, "ms-if", lam, lam) for lam in lams]
                                    + [att.query_vectors(grads, "gdp")], len(sel))  # P_pt P_ft g per λ, then g
                    U_ft = (_stacked([att.query_vectors(grads, "ss-if", lam, lam) for lam in lams], len(sel))
                            if task == "qa" else None)  # P_ft g per λ
                    del grads
                with T("candidate pass θ_pt"):
                    out.pt.update(zip(keys, _score_stage(att, U_pt, "ms-if", rows_of, len(lams) + 1, encoded)))
                    out.passes["pt"] += 1
                del U_pt
                if U_ft is not None:
                    with T("candidate pass θ_ft"):
                        out.ft.update(zip(keys, _score_stage(att, U_ft, "ss-if", rows_of, len(lams), encoded)))
                        out.passes["ft"] += 1
                del U_ft
            log(f"{task} trial {t}: {len(sel_all)} queries scored (so far: query vectors "
                 f"{T.get('query vectors', 0):.0f}s, θ_pt passes {T.get('candidate pass θ_pt', 0):.0f}s, "
                 f"θ_ft passes {T.get('candidate pass θ_ft', 0):.0f}s)", s.progress)
    return out


def _repsim(s: Setup, q: Queries, c: CandidateSets, inf: _Influence) -> dict[str, np.ndarray]:
    """RepSim of every query of a task against every candidate any trial gives it (NaN elsewhere)."""
    from ..influence.attribute import Query

    out = {}
    with s.timings("repsim"):
        for task, qs in q.tasks.items():
            att = inf.attributors[(task, s.trials[0])]
            prepared = att.prepare([Query(prompt=x.prompt, answer=x.answer, label=x.label, id=x.fact_id) for x in qs])
            need = sorted({int(r) for (tk, _, _, _), rows in c.rows.items() if tk == task for r in rows})
            res = att.score(prepared, [s.texts[r] for r in need], need, method="repsim")
            M = np.full((len(qs), s.n_docs), np.nan)
            M[:, need] = res.scores.numpy()
            out[task] = M
    return out


@dataclass
class _Scores:
    """Every method's candidate scores, for :func:`_method_scores`."""

    inf: _Influence
    retrieval: Retrieval
    repsim: dict[str, np.ndarray]
    dampings: list


def _method_scores(method: str, key: tuple, rows: np.ndarray, sc: _Scores, rng) -> list[tuple[float | str | None, np.ndarray]]:
    """``[(damping or None, scores aligned with rows)]`` of one method for one query's candidates;
    ``key = (task, trial, query index)``."""
    task, _, qi = key
    lams = sc.dampings
    if method in INFLUENCE_METHODS:
        pos = np.searchsorted(sc.inf.rows[key], rows)
        if method == "ms-if":
            return [(lam, sc.inf.pt[key][d, pos]) for d, lam in enumerate(lams)]
        if method == "gdp":
            return [(None, sc.inf.pt[key][len(lams), pos])]
        return [(lam, sc.inf.ft[key][d, pos]) for d, lam in enumerate(lams)]
    if method == "repsim":
        return [(None, sc.repsim[task][qi, rows])]
    if method == "bm25":
        return [(None, sc.retrieval.bm25[task][qi, rows])]
    if method == "embedding":
        return [(None, sc.retrieval.embedding[task][qi, rows])]
    if method == "random":
        return [(None, rng.standard_normal(len(rows)))]
    raise ValueError(f"unknown method {method!r}")


def _chance(rows: np.ndarray, gold: np.ndarray, q: FactQuery, k: int) -> dict:
    g = int(gold.sum())
    return {"mrr": chance_mrr(len(rows), g), f"recall_any@{k}": chance_recall_any(len(rows), g, k),
            f"recall_frac@{k}": chance_recall_frac(len(rows), g, k, q.n_gold)}


def _setting_metrics(s: Setup, q: Queries, c: CandidateSets, sc: _Scores, task: str, setting: str, score_hook) -> tuple[list, dict]:
    """The result rows of one (task, candidate setting) (mean ± std over trials per method and damping)
    and its chance level."""
    cfg, qs = s.cfg, q.tasks[task]
    methods = QA_METHODS if task == "qa" else CLS_METHODS
    per_trial: dict[tuple, list[dict]] = {}
    chance_trial = []
    for t in s.trials:
        rng = np.random.default_rng([cfg.seed, t, 31, 0 if task == "qa" else 1, 0 if setting == "knn" else 1])
        ch = []
        for qi in q.trial_q[task][t]:
            rows = c.rows[(task, setting, t, qi)]
            gold = np.isin(rows, qs[qi].gold)
            ch.append(_chance(rows, gold, qs[qi], cfg.k))
            for method in methods:
                for lam, scores in _method_scores(method, (task, t, qi), rows, sc, rng):
                    if score_hook is not None:
                        scores = score_hook(task, setting, method, scores, qs[qi])
                    per_trial.setdefault((method, lam, t), []).append(query_metrics(scores, gold, n_gold=qs[qi].n_gold, ks=(cfg.k,)))
        chance_trial.append({k: float(np.mean([x[k] for x in ch])) for k in ch[0]})
    chance = {k: summarize([x[k] for x in chance_trial]) for k in chance_trial[0]}
    keys = sorted({(m, lam) for (m, lam, _) in per_trial},
                  key=lambda x: (methods.index(x[0]), -1 if x[1] is None else s.dampings.index(x[1])))
    results = []
    for method, lam in keys:
        row = {"task": task, "setting": setting, "method": method, "damping": lam}
        for mn in per_trial[(method, lam, s.trials[0])][0]:
            row[mn] = summarize([np.mean([m[mn] for m in per_trial[(method, lam, t)]]) for t in s.trials])
        results.append(row)
    return results, chance


def _metrics(s: Setup, q: Queries, c: CandidateSets, sc: _Scores, score_hook) -> tuple[list, dict]:
    results, chance = [], {}
    with s.timings("metrics"):
        for task in q.tasks:
            for setting in SETTINGS:
                rows, chance[(task, setting)] = _setting_metrics(s, q, c, sc, task, setting, score_hook)
                results += rows
    return results, chance


def _best_and_verdict(results: list, tasks, dampings: list) -> tuple[list, dict]:
    """The best damping of each damped method by mean MRR, and whether MS-IF at its best beats every
    other model-based method at theirs, per (task, setting)."""
    best, verdict = [], {}
    for task in tasks:
        for setting in SETTINGS:
            def rows_of(method):
                return [r for r in results if r["task"] == task and r["setting"] == setting and r["method"] == method]

            for method in DAMPED:
                if rows_of(method):
                    b = max(rows_of(method), key=lambda r: (r["mrr"]["mean"], -dampings.index(r["damping"])))
                    best.append({"task": task, "setting": setting, "method": method, "damping": b["damping"], "mrr": b["mrr"]})
            mrr = {m: max(r["mrr"]["mean"] for r in rows_of(m)) for m in ("ms-if", "ss-if", "gdp", "repsim") if rows_of(m)}
            ms = mrr.pop("ms-if", None)
            verdict[f"{task}/{setting}"] = {"ms-if_best_mrr": ms, "baselines_best_mrr": mrr,
                                            "ms-if_beats_all": bool(all(ms > v for v in mrr.values()))}
    return best, verdict


def _damping_summary(dampings: list, mean_eig: dict, trials: list[int]) -> dict:
    """Each damping as (absolute λ, multiple of the mean eigenvalue) for every factor set, and the notes."""
    eig = {}
    for n in ("pt", "ft", "cls"):
        vals = [mean_eig[n][t] for t in trials if t in mean_eig[n]]
        eig[n] = float(np.mean(vals)) if vals else None
    relative = Damping.parse(dampings[0]).relative
    equivalents = {n: [(Damping.parse(lam).value * eig[n], Damping.parse(lam).value) if relative else (lam, lam / eig[n])
                       for lam in dampings] for n in eig if eig[n]}
    return {
        "dampings": dampings,
        "damping_mode": "relative" if relative else "absolute",
        "damping_note": ("relative: λ = c × the mean eigenvalue of each factor set (so G_pt and G_ft get different "
                         "absolute λ)" if relative else
                         "absolute λ, the same for G_pt and G_ft; relative = λ / mean eigenvalue of the factor set"),
        "damping_equivalents": {n: [{"absolute": a, "relative": r} for a, r in v] for n, v in equivalents.items()},
        "mean_eigenvalue": eig,
        "relative_dampings": {n: [r for _, r in v] for n, v in equivalents.items()},
    }


def _report(s: Setup, q: Queries, c: CandidateSets, inf: _Influence, results: list, chance: dict, mean_eig: dict,
            total: float) -> dict:
    """The results dict (see :func:`write_outputs`)."""
    cfg, world, trials = s.cfg, s.world, s.trials
    best, verdict = _best_and_verdict(results, q.tasks, s.dampings)
    cr = {task: {"mean_fraction_of_gold": summarize([np.mean([a for a, _ in c.recall[task][t]]) for t in trials]),
                 "any_gold": summarize([np.mean([b for _, b in c.recall[task][t]]) for t in trials]),
                 "k": cfg.k_candidates} for task in q.tasks}
    return {
        "benchmark": "fact-tracing",
        "config": asdict(cfg),
        "world": {"path": str(world.path), "size": world.meta.get("size"), "kind": world.kind, "hash": world.meta.get("hash"),
                  "documents": s.n_docs, "test_facts": q.n_qa, "classification_queries": q.n_cls,
                  "classifier_heldout_accuracy": q.cls_accuracy if cfg.classification else None,
                  "qa_heldout_accuracy": world.meta.get("accuracy", {}).get("qa_heldout", {}).get("accuracy"),
                  "hard": world.meta.get("stats", {}).get("hard")},
        "trials": {"n": cfg.trials, "what_varies": "query subset (n_queries of the test facts without replacement, "
                   "all when fewer), random pool documents and random-control scores (seed+t), and the "
                   "label-sampling seed t of every curvature fit",
                   "queries_per_trial": {task: [len(q.trial_q[task][t]) for t in trials] for task in q.tasks}},
        **_damping_summary(s.dampings, mean_eig, trials),
        "candidate_recall": cr,
        "chance": [{"task": tk, "setting": st, **v} for (tk, st), v in chance.items()],
        "results": results,
        "best_damping": best,
        "verdict": verdict,
        "timings_s": {**s.timings.rounded(), "total": round(total, 2)},
        "candidate_passes": inf.passes,
        "refine_query": ({f"{tk}-trial{t}": a.refine_summary() for (tk, t), a in inf.attributors.items()}
                         if cfg.refine_query else None),
    }


# ------------------------------------------------------------------------------------------ the run


def run_fact_tracing(config: FactTracingConfig | None = None, world=None, cache_dir: str | Path | None = None,
                     progress: bool = True, score_hook: Callable | None = None) -> dict:
    """Run the benchmark; returns the results dict (see :func:`write_outputs`).

    ``world``: a loaded :class:`msif.worldfacts.World` (default: ``load_world(size=config.size)``).
    ``cache_dir``: where factors and the embedding index are cached (default: a ``cache`` folder in the
    current directory's ``runs/fact-tracing``; the CLI passes ``<out>/cache``).
    ``score_hook(task, setting, method, scores, query) -> scores``: replaces a method's candidate
    scores before ranking (tests use it to check that random scores give chance-level metrics).
    """
    import time

    cfg = config or FactTracingConfig()
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        t_start = time.perf_counter()
        s = setup(cfg, world, cache_dir, progress, parse_dampings(cfg.dampings))
        q = queries(s)
        r = retrieval(s, q)
        c = candidate_sets(s, q, r)
        fits, mean_eig = factor_sets(s, q)
        inf = _influence(s, q, c, fits)
        sc = _Scores(inf, r, _repsim(s, q, c, inf), s.dampings)
        results, chance = _metrics(s, q, c, sc, score_hook)
        out = _report(s, q, c, inf, results, chance, mean_eig, time.perf_counter() - t_start)
        log("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in out["timings_s"].items()), progress)
        return out
    finally:
        torch.set_num_threads(old_threads)
