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

Cost: a candidate's gradient does not depend on the query, the damping or the trial, so every
document any query needs is pushed through θ_pt once (and through θ_ft once, for SS-IF), and its
per-document gradient is contracted with the stacked query vectors of every (query, trial, damping)
that has it as a candidate. Factors and the embedding index are cached under ``cache_dir``.

:func:`run_fact_tracing` returns a JSON-serialisable dict; :func:`write_outputs` writes it as JSON, a
markdown table and a Figure-3-style plot.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .outputs import write_outputs as _write_outputs

from .metrics import (
    chance_mrr,
    chance_recall_any,
    chance_recall_frac,
    fmt_mean_std,
    query_metrics,
    summarize,
)

INFLUENCE_METHODS = ("ms-if", "ss-if", "gdp")
QA_METHODS = ("ms-if", "ss-if", "gdp", "repsim", "bm25", "embedding", "random")
CLS_METHODS = ("ms-if", "gdp", "repsim", "bm25", "embedding", "random")
DAMPED = ("ms-if", "ss-if")
SETTINGS = ("knn", "pool")
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


def _log(msg: str, progress: bool):
    if progress:
        print(f"[fact-tracing] {msg}", file=sys.stderr, flush=True)


class _Timer:
    def __init__(self):
        self.t: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.t[name] = timer.t.get(name, 0.0) + time.perf_counter() - self.t0

        return _Ctx()


# ------------------------------------------------------------------------------------------ queries


@dataclass
class _Q:
    """One query: a fact, its task, its text for retrieval, and its gold rows."""

    fact_id: str
    task: str  # qa | cls
    prompt: str  # the model input (qa prompt, or the classifier's text)
    answer: str | None
    label: int | None
    retrieval_text: str
    gold: np.ndarray  # corpus rows of the sources
    n_gold: int


@dataclass
class _Request:
    """Scores wanted from one candidate pass: the vectors ``U (V, P)`` of one query against ``rows``."""

    key: tuple
    U: torch.Tensor
    rows: np.ndarray


# ------------------------------------------------------------------------------------ the pipeline


def _flatten(vectors: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """Module dict of ``(Q, out, in)`` → ``(Q, P)`` float32 in the order of ``names``."""
    return torch.cat([vectors[n].reshape(vectors[n].shape[0], -1) for n in names], 1).float()


def candidate_pass(model, modules, encoded: dict[int, object], requests: list[_Request], batch_size: int, pad_id: int,
                   progress: bool = False, desc: str = "candidates") -> dict[tuple, np.ndarray]:
    """Scores ``U_r · DW(z)`` for every request ``r`` and each of its candidate rows ``z``.

    Each needed document goes through ``model`` once (forward + activation-only backward, data labels,
    LM loss: :func:`msif.curvature.hooks.per_example_grads`); its per-document gradient, flattened in the
    order of ``modules``, is contracted with the vectors of every request that lists it. Returns
    ``{key: (V, len(rows)) float64}``.
    """
    from ..curvature.hooks import per_example_grads
    from ..data.encoding import collate

    names = [tm.name for tm in modules]
    out = {r.key: np.zeros((r.U.shape[0], len(r.rows)), np.float64) for r in requests}
    if not requests:
        return out
    ent_req = np.concatenate([np.full(len(r.rows), i, np.int64) for i, r in enumerate(requests)])
    ent_pos = np.concatenate([np.arange(len(r.rows), dtype=np.int64) for r in requests])
    ent_row = np.concatenate([np.asarray(r.rows, np.int64) for r in requests])
    needed = np.unique(ent_row)
    needed = sorted(needed.tolist(), key=lambda r: (len(encoded[r].input_ids), r))
    n_max = int(ent_row.max()) + 1
    done = 0
    t0 = time.perf_counter()
    for lo in range(0, len(needed), batch_size):
        rows = needed[lo : lo + batch_size]
        batch = collate([encoded[r] for r in rows], pad_id=pad_id)
        g = per_example_grads(model, modules, batch, "lm")
        G = torch.cat([g[n].reshape(len(rows), -1) for n in names], 1)  # (B, P)
        local = np.full(n_max, -1, np.int64)
        local[np.asarray(rows, np.int64)] = np.arange(len(rows))
        sel = np.flatnonzero(local[ent_row] >= 0)
        if sel.size:
            order = sel[np.argsort(ent_req[sel], kind="stable")]
            reqs = ent_req[order]
            cuts = np.flatnonzero(np.diff(reqs)) + 1
            for part in np.split(order, cuts):
                r = requests[int(ent_req[part[0]])]
                loc = torch.from_numpy(local[ent_row[part]])
                s = (G[loc] @ r.U.T).double().numpy()  # (n, V)
                out[r.key][:, ent_pos[part]] = s.T
        done += len(rows)
        if progress and (lo // batch_size) % 20 == 0:
            el = time.perf_counter() - t0
            print(f"[fact-tracing] {desc}: {done}/{len(needed)} documents ({el:.0f}s)", file=sys.stderr, flush=True)
    return out


def fit_or_load(path: Path, model_dir: Path, data: Path, objective: str, seed: int, cfg, progress: bool):
    """Factors cached at ``path`` (refitted in place when missing or no longer loading), fitted on ``data``
    with label-sampling seed ``seed`` and ``cfg``'s ``fit_batch_size`` / ``max_fit_examples`` / ``refine``
    (any benchmark config with those fields); returns ``(factors, fitted_now)``."""
    from ..api import fit
    from ..curvature.factors import FactorError, FactorSet

    if (path / "factors.json").is_file():
        try:
            return FactorSet.load(path), False
        except FactorError:
            pass
    fs = fit(str(model_dir), str(data), out=path, objective=objective, seed=seed, batch_size=cfg.fit_batch_size,
             max_examples=cfg.max_fit_examples, progress=False, refine=cfg.refine, overwrite=True)  # our own cache folder
    return fs, True


def _bm25_matrix(bm25, texts: list[str], n_docs: int) -> np.ndarray:
    hits = bm25.search(texts, k=n_docs)
    M = np.zeros((len(texts), n_docs), np.float64)
    for i in range(len(texts)):
        ok = hits.rows[i] >= 0
        M[i, hits.rows[i][ok]] = hits.scores[i][ok]
    return M


def run_fact_tracing(config: FactTracingConfig | None = None, world=None, cache_dir: str | Path | None = None,
                     progress: bool = True, score_hook: Callable | None = None) -> dict:
    """Run the benchmark; returns the results dict (see :func:`write_outputs`).

    ``world``: a loaded :class:`msif.worldfacts.World` (default: ``load_world(size=config.size)``).
    ``cache_dir``: where factors and the embedding index are cached (default: a ``cache`` folder in the
    current directory's ``runs/fact-tracing``; the CLI passes ``<out>/cache``).
    ``score_hook(task, setting, method, scores, query) -> scores``: replaces a method's candidate
    scores before ranking (tests use it to check that random scores give chance-level metrics).
    """
    cfg = config or FactTracingConfig()
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, world, cache_dir, progress, score_hook)
    finally:
        torch.set_num_threads(old_threads)


def _run(cfg: FactTracingConfig, world, cache_dir, progress: bool, score_hook) -> dict:
    from ..curvature.factors import FactorSet  # noqa: F401  (import check before long work)
    from ..data.encoding import pad_token_id
    from ..influence.attribute import Attributor, Query
    from ..models.loading import load_model, load_tokenizer
    from ..retrieval import BM25Index, build_index, load_index

    T = _Timer()
    t_start = time.perf_counter()
    if world is None:
        from ..worldfacts import load_world

        with T("world"):
            world = load_world(seed=cfg.world_seed, size=cfg.size, progress=progress, world=cfg.world)
    if world.kind != cfg.world:
        raise ValueError(f"the world given is the {world.kind} world, but the configuration asks for the {cfg.world} one")
    cache = Path(cache_dir) if cache_dir is not None else Path("runs/fact-tracing/cache")
    cache = cache / f"world-{world.meta.get('hash', world.path.name)}"
    cache.mkdir(parents=True, exist_ok=True)
    _log(f"{world.kind} world {world.path} ({world.meta['stats']['documents']} documents, {len(world.test_facts)} test facts); "
         f"cache {cache}", progress)

    docs = world.documents
    texts = [d["text"] for d in docs]
    row_of = {d["id"]: i for i, d in enumerate(docs)}
    n_docs = len(docs)
    trials = list(range(cfg.trials))
    dampings = [_parse_damping(x) for x in cfg.dampings]
    if len({_damping_kind(x) for x in dampings}) > 1:
        raise ValueError("give either absolute dampings or relative ones ('0.1x'), not both")

    # ---------------------------------------------------------------- models
    with T("load models"):
        tok = load_tokenizer(str(world.pretrained_dir))
        pt = load_model(str(world.pretrained_dir), task="causal_lm")
        ft = load_model(str(world.finetuned_dir), task="causal_lm")
        clf = load_model(str(world.classifier_dir), task="auto") if cfg.classification else None

    # ---------------------------------------------------------------- retrieval
    with T("embedding index"):
        idx_dir = cache / "index"
        index = None
        if (idx_dir / "meta.json").is_file():
            try:
                index = load_index(idx_dir, corpus=world.corpus_path)
                if not (idx_dir / "embeddings.npy").is_file():
                    index = None
            except Exception:
                index = None
        if index is None:
            index = build_index(world.corpus_path, idx_dir, index_type="flat", progress=False, overwrite=True,
                                keep_embeddings=True)
        E = np.load(idx_dir / "embeddings.npy").astype(np.float32)
    with T("bm25 index"):
        bm25 = BM25Index.build(texts, doc_ids=[d["id"] for d in docs])

    # ---------------------------------------------------------------- queries
    qa_all = [
        _Q(f.id, "qa", world.qa_prompt(f.question), f.answer, None, f.question + f.answer,
           np.array(sorted(row_of[s] for s in f.sources), np.int64), len(f.sources))
        for f in sorted(world.test_facts, key=lambda f: f.id)
    ]
    cls_all: list[_Q] = []
    labels = world.continent_labels
    if cfg.classification:
        with T("classifier predictions"):
            cand = sorted((f for f in world.heldout_facts if f.relation == "continent"), key=lambda f: f.id)
            probe = Attributor(pt, clf, tok, check_fingerprints=False)
            if cand:
                prep = probe.prepare([Query(prompt=f.question, label=None, id=f.id) for f in cand])
                for f, p in zip(cand, prep):
                    if labels[p.label] == f.object:
                        cls_all.append(_Q(f.id, "cls", f.question, None, p.label, f.question + f.answer,
                                          np.array(sorted(row_of[s] for s in f.sources), np.int64), len(f.sources)))
            cls_accuracy = len(cls_all) / max(1, len(cand))
            del probe
    _log(f"queries: {len(qa_all)} QA test facts, {len(cls_all)} classification facts", progress)

    def subset(all_q: list[_Q], t: int) -> list[int]:
        n = len(all_q)
        if cfg.n_queries >= n:
            return list(range(n))
        rng = np.random.default_rng([cfg.seed, t, 17])
        return sorted(rng.choice(n, cfg.n_queries, replace=False).tolist())

    if not qa_all:
        raise ValueError(f"the world {world.path} has no QA test facts (held-out facts the fine-tuned model answers "
                         "correctly): nothing to trace")
    tasks = {"qa": qa_all}
    if cfg.classification and cls_all:
        tasks["cls"] = cls_all
    trial_q = {task: {t: subset(qs, t) for t in trials} for task, qs in tasks.items()}

    # retrieval matrices for every query of a task (model-free, trial-free)
    with T("retrieval"):
        emb_scores, bm25_scores, knn = {}, {}, {}
        for task, qs in tasks.items():
            qtexts = [q.retrieval_text for q in qs]
            qe = index.encoder.encode(qtexts)
            emb_scores[task] = (qe @ E.T).astype(np.float64)
            knn[task] = index.search_vectors(qe, cfg.k_candidates).rows
            bm25_scores[task] = _bm25_matrix(bm25, qtexts, n_docs)

    # candidate lists per (task, setting, trial, query index)
    cands: dict[tuple, np.ndarray] = {}
    cand_recall: dict[str, dict[int, list]] = {}
    for task, qs in tasks.items():
        cand_recall[task] = {}
        for t in trials:
            rng = np.random.default_rng([cfg.seed, t, 29, 0 if task == "qa" else 1])
            rec = []
            for qi in trial_q[task][t]:
                q = qs[qi]
                rows = knn[task][qi]
                rows = rows[rows >= 0]
                cands[(task, "knn", t, qi)] = rows
                n_in = int(np.isin(q.gold, rows).sum())
                rec.append((n_in / q.n_gold, float(n_in > 0)))
                # pool: gold + BM25 top hits + random fill, shuffled
                pool = list(q.gold.tolist())
                top_bm25 = np.argsort(-bm25_scores[task][qi], kind="stable")[: cfg.pool_bm25]
                for r in top_bm25.tolist():
                    if bm25_scores[task][qi][r] > 0 and r not in pool:
                        pool.append(r)
                chosen = set(pool)
                need = max(0, min(cfg.pool_size, n_docs) - len(pool))
                if need:
                    rest = np.array([r for r in range(n_docs) if r not in chosen], np.int64)
                    pool += rng.choice(rest, min(need, len(rest)), replace=False).tolist()
                pool = np.array(pool, np.int64)
                rng.shuffle(pool)
                cands[(task, "pool", t, qi)] = pool
            cand_recall[task][t] = rec

    # ---------------------------------------------------------------- factors
    fits = {}
    mean_eig = {"pt": {}, "ft": {}, "cls": {}}
    with T("factors"):
        for t in trials:
            specs = [("pt", world.pretrained_dir, world.corpus_path, "lm"),
                     ("ft", world.finetuned_dir, world.qa_finetune_path, "answer")]
            if "cls" in tasks:
                specs.append(("cls", world.classifier_dir, world.cls_finetune_path, "classification"))
            for name, mdir, data, obj in specs:
                t0 = time.perf_counter()
                tag = f"{name}-seed{t}" + (f"-refine{cfg.refine}" if cfg.refine else "")
                fs, fresh = fit_or_load(cache / "factors" / tag, mdir, data, obj, t, cfg, progress)
                fits[(name, t)] = fs
                mean_eig[name][t] = fs.mean_eigenvalue()
                _log(f"factors {name} seed {t}: {'fitted' if fresh else 'loaded'} in {time.perf_counter() - t0:.1f}s, "
                     f"mean eigenvalue {mean_eig[name][t]:.3g}", progress)

    # ---------------------------------------------------------------- query vectors + candidate passes
    # per (task, trial), in chunks of queries whose stacked vectors fit cfg.max_vector_bytes:
    # θ_pt pass with [ms-if at each damping..., gdp] per query; θ_ft pass (qa) with [ss-if at each damping...]
    shared_names: list[str] | None = None
    req_rows: dict[tuple, np.ndarray] = {}
    pt_scores: dict[tuple, np.ndarray] = {}
    ft_scores: dict[tuple, np.ndarray] = {}
    atts = {}
    encoded: dict[int, object] = {}
    pad = pad_token_id(tok)
    n_passes = {"pt": 0, "ft": 0}
    for task, qs in tasks.items():
        for t in trials:
            with T("query vectors"):
                ft_model = ft if task == "qa" else clf
                att = Attributor(pt, ft_model, tok, fits[("pt", t)], fits[("ft" if task == "qa" else "cls", t)],
                                 batch_size=cfg.batch_size, refine_query=cfg.refine_query, gvp_examples=cfg.gvp_examples,
                                 pretrained_data=world.corpus_path,
                                 finetuned_data=world.qa_finetune_path if task == "qa" else world.cls_finetune_path)
                atts[(task, t)] = att
                names = [tm.name for tm in att.shared]
                if shared_names is None:
                    shared_names = names
                    modules = list(att.shared)
                    encoded = dict(enumerate(att.encode_candidates(texts, range(n_docs))))
                elif names != shared_names:
                    raise RuntimeError("the QA and classification models track different modules")
            P = sum(tm.out_features * tm.in_dim for tm in modules)
            per_query = (len(dampings) + 1) * P * 4
            chunk = max(1, int(cfg.max_vector_bytes // per_query))
            sel_all = trial_q[task][t]
            for c0 in range(0, len(sel_all), chunk):
                sel = sel_all[c0 : c0 + chunk]
                with T("query vectors"):
                    prepared = att.prepare([Query(prompt=qs[i].prompt, answer=qs[i].answer, label=qs[i].label,
                                                  id=qs[i].fact_id) for i in sel])
                    grads = att.query_gradients(prepared, factored=True)
                    ms, ss = [], []
                    for lam in dampings:
                        ms.append(_flatten(att.query_vectors(grads, "ms-if", lam, lam), names))  # P_pt P_ft g
                        if task == "qa":
                            ss.append(_flatten(att.query_vectors(grads, "ss-if", lam, lam), names))  # P_ft g
                    ms.append(_flatten(att.query_vectors(grads, "gdp"), names))  # g
                    del grads
                    pt_req, ft_req = [], []
                    for j, qi in enumerate(sel):
                        rows = np.unique(np.concatenate([cands[(task, s_, t, qi)] for s_ in SETTINGS]))
                        req_rows[(task, t, qi)] = rows
                        pt_req.append(_Request((task, t, qi), torch.stack([m[j] for m in ms]), rows))
                        if ss:
                            ft_req.append(_Request((task, t, qi), torch.stack([m[j] for m in ss]), rows))
                    del ms, ss
                with T("candidate pass θ_pt"):
                    pt_scores.update(candidate_pass(pt, modules, encoded, pt_req, cfg.batch_size, pad, progress,
                                                    f"{task} trial {t} θ_pt pass"))
                    n_passes["pt"] += 1
                del pt_req
                if ft_req:
                    with T("candidate pass θ_ft"):
                        ft_scores.update(candidate_pass(ft, modules, encoded, ft_req, cfg.batch_size, pad, progress,
                                                        f"{task} trial {t} θ_ft pass"))
                        n_passes["ft"] += 1
                del ft_req
            _log(f"{task} trial {t}: {len(sel_all)} queries scored (so far: query vectors "
                 f"{T.t.get('query vectors', 0):.0f}s, θ_pt passes {T.t.get('candidate pass θ_pt', 0):.0f}s, "
                 f"θ_ft passes {T.t.get('candidate pass θ_ft', 0):.0f}s)", progress)

    # ---------------------------------------------------------------- repsim (trial-free)
    repsim = {}
    with T("repsim"):
        for task, qs in tasks.items():
            att = atts[(task, trials[0])]
            prepared = att.prepare([Query(prompt=q.prompt, answer=q.answer, label=q.label, id=q.fact_id) for q in qs])
            need = sorted({int(r) for (tk, _, _, _), rows in cands.items() if tk == task for r in rows})
            res = att.score(prepared, [texts[r] for r in need], need, method="repsim")
            M = np.full((len(qs), n_docs), np.nan)
            M[:, need] = res.scores.numpy()
            repsim[task] = M

    # ---------------------------------------------------------------- metrics
    with T("metrics"):
        results = []
        chance = {}
        for task, qs in tasks.items():
            methods = QA_METHODS if task == "qa" else CLS_METHODS
            for setting in SETTINGS:
                per_trial: dict[tuple, list[dict]] = {}
                chance_trial = []
                for t in trials:
                    rng = np.random.default_rng([cfg.seed, t, 31, 0 if task == "qa" else 1, 0 if setting == "knn" else 1])
                    ch = []
                    for qi in trial_q[task][t]:
                        q = qs[qi]
                        rows = cands[(task, setting, t, qi)]
                        gold = np.isin(rows, q.gold)
                        g = int(gold.sum())
                        ch.append({"mrr": chance_mrr(len(rows), g),
                                   f"recall_any@{cfg.k}": chance_recall_any(len(rows), g, cfg.k),
                                   f"recall_frac@{cfg.k}": chance_recall_frac(len(rows), g, cfg.k, q.n_gold)})
                        for method in methods:
                            variants = _method_scores(method, task, t, qi, rows, dampings, pt_scores, ft_scores,
                                                      req_rows, emb_scores, bm25_scores, repsim, rng)
                            for lam, s in variants:
                                if score_hook is not None:
                                    s = score_hook(task, setting, method, s, q)
                                m = query_metrics(s, gold, n_gold=q.n_gold, ks=(cfg.k,))
                                per_trial.setdefault((method, lam, t), []).append(m)
                    chance_trial.append({k: float(np.mean([c[k] for c in ch])) for k in ch[0]})
                chance[(task, setting)] = {k: summarize([c[k] for c in chance_trial]) for k in chance_trial[0]}
                keys = sorted({(m, lam) for (m, lam, _) in per_trial},
                              key=lambda x: (methods.index(x[0]), -1 if x[1] is None else dampings.index(x[1])))
                for method, lam in keys:
                    row = {"task": task, "setting": setting, "method": method, "damping": lam}
                    metric_names = list(per_trial[(method, lam, trials[0])][0])
                    for mn in metric_names:
                        row[mn] = summarize([np.mean([m[mn] for m in per_trial[(method, lam, t)]]) for t in trials])
                    results.append(row)

    # ---------------------------------------------------------------- summary
    def rel(name):
        vals = [mean_eig[name][t] for t in trials if t in mean_eig[name]]
        return float(np.mean(vals)) if vals else None

    eig = {n: rel(n) for n in ("pt", "ft", "cls")}
    relative_mode = _damping_kind(dampings[0]) == "relative"
    # each damping as (absolute λ, multiple of the mean eigenvalue) for every factor set
    equivalents = {n: [(_damping_value(lam) * eig[n], _damping_value(lam)) if relative_mode
                       else (lam, lam / eig[n]) for lam in dampings] for n in eig if eig[n]}
    best = []
    for task in tasks:
        for setting in SETTINGS:
            for method in DAMPED:
                rows = [r for r in results if r["task"] == task and r["setting"] == setting and r["method"] == method]
                if rows:
                    b = max(rows, key=lambda r: (r["mrr"]["mean"], -dampings.index(r["damping"])))
                    best.append({"task": task, "setting": setting, "method": method, "damping": b["damping"],
                                 "mrr": b["mrr"]})
    verdict = {}
    for task in tasks:
        for setting in SETTINGS:
            def mrr(method, lam=None):
                rows = [r for r in results if r["task"] == task and r["setting"] == setting and r["method"] == method]
                if not rows:
                    return None
                return max(r["mrr"]["mean"] for r in rows)

            ms = mrr("ms-if")
            others = {m: mrr(m) for m in ("ss-if", "gdp", "repsim") if mrr(m) is not None}
            verdict[f"{task}/{setting}"] = {"ms-if_best_mrr": ms, "baselines_best_mrr": others,
                                            "ms-if_beats_all": bool(all(ms > v for v in others.values()))}

    cr = {}
    for task in tasks:
        cr[task] = {"mean_fraction_of_gold": summarize([np.mean([a for a, _ in cand_recall[task][t]]) for t in trials]),
                    "any_gold": summarize([np.mean([b for _, b in cand_recall[task][t]]) for t in trials]),
                    "k": cfg.k_candidates}
    total = time.perf_counter() - t_start
    out = {
        "benchmark": "fact-tracing",
        "config": asdict(cfg),
        "world": {"path": str(world.path), "size": world.meta.get("size"), "kind": world.kind, "hash": world.meta.get("hash"),
                  "documents": n_docs, "test_facts": len(qa_all), "classification_queries": len(cls_all),
                  "classifier_heldout_accuracy": cls_accuracy if cfg.classification else None,
                  "qa_heldout_accuracy": world.meta.get("accuracy", {}).get("qa_heldout", {}).get("accuracy"),
                  "hard": world.meta.get("stats", {}).get("hard")},
        "trials": {"n": cfg.trials, "what_varies": "query subset (n_queries of the test facts without replacement, "
                   "all when fewer), random pool documents and random-control scores (seed+t), and the "
                   "label-sampling seed t of every curvature fit",
                   "queries_per_trial": {task: [len(trial_q[task][t]) for t in trials] for task in tasks}},
        "dampings": dampings,
        "damping_mode": "relative" if relative_mode else "absolute",
        "damping_note": ("relative: λ = c × the mean eigenvalue of each factor set (so G_pt and G_ft get different "
                         "absolute λ)" if relative_mode else
                         "absolute λ, the same for G_pt and G_ft; relative = λ / mean eigenvalue of the factor set"),
        "damping_equivalents": {n: [{"absolute": a, "relative": r} for a, r in v] for n, v in equivalents.items()},
        "mean_eigenvalue": eig,
        "relative_dampings": {n: [r for _, r in v] for n, v in equivalents.items()},
        "candidate_recall": cr,
        "chance": [{"task": tk, "setting": st, **v} for (tk, st), v in chance.items()],
        "results": results,
        "best_damping": best,
        "verdict": verdict,
        "timings_s": {**{k: round(v, 2) for k, v in T.t.items()}, "total": round(total, 2)},
        "candidate_passes": n_passes,
        "refine_query": ({f"{tk}-trial{t}": a.refine_summary() for (tk, t), a in atts.items()}
                         if cfg.refine_query else None),
    }
    _log("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in out["timings_s"].items()), progress)
    return out


def _method_scores(method, task, t, qi, rows, dampings, pt_scores, ft_scores, req_rows, emb_scores, bm25_scores,
                   repsim, rng) -> list[tuple[float | None, np.ndarray]]:
    """``[(damping or None, scores aligned with rows)]`` of one method for one query's candidates."""
    if method in INFLUENCE_METHODS:
        key = (task, t, qi)
        pos = np.searchsorted(req_rows[key], rows)
        if method == "ms-if":
            return [(lam, pt_scores[key][d, pos]) for d, lam in enumerate(dampings)]
        if method == "gdp":
            return [(None, pt_scores[key][len(dampings), pos])]
        return [(lam, ft_scores[key][d, pos]) for d, lam in enumerate(dampings)]
    if method == "repsim":
        return [(None, repsim[task][qi, rows])]
    if method == "bm25":
        return [(None, bm25_scores[task][qi, rows])]
    if method == "embedding":
        return [(None, emb_scores[task][qi, rows])]
    if method == "random":
        return [(None, rng.standard_normal(len(rows)))]
    raise ValueError(f"unknown method {method!r}")


# ------------------------------------------------------------------------------------------ outputs

_TASK_NAMES = {"qa": "QA fine-tune", "cls": "classification fine-tune"}
_SETTING_NAMES = {"knn": "candidates = embedding nearest neighbours", "pool": "candidates = fixed rerank pool"}


def _parse_damping(x):
    """A float (absolute λ) or a ``"0.1x"`` string (relative to each factor set's mean eigenvalue)."""
    if isinstance(x, str):
        t = x.strip().lower()
        if t.endswith("x"):
            v = float(t[:-1])
            if not v >= 0:
                raise ValueError(f"damping must be ≥ 0, not {x!r}")
            return f"{v:g}x"
        x = float(t)
    x = float(x)
    if not x >= 0 or math.isinf(x):
        raise ValueError(f"damping must be a finite number ≥ 0, not {x}")
    return x


def _damping_kind(x) -> str:
    return "relative" if isinstance(x, str) else "absolute"


def _damping_value(x) -> float:
    """The number on the damping axis: λ (absolute) or the multiple c of ``"cx"`` (relative)."""
    return float(x[:-1]) if isinstance(x, str) else float(x)


def _fmt_damping(lam) -> str:
    if lam is None:
        return "–"
    return lam if isinstance(lam, str) else f"{lam:.0e}"


def markdown(res: dict) -> str:
    """The results as markdown tables (one per task and candidate setting) with the notes that read them."""
    cfg = res["config"]
    k = cfg["k"]
    lines = [f"# Fact tracing (paper §5.3) on the {res['world']['size']} {res['world'].get('kind', 'standard')} world", ""]
    w = res["world"]
    lines.append(f"World `{w['hash']}`: {w['documents']} documents, {w['test_facts']} QA test facts "
                 f"(held-out QA accuracy {w['qa_heldout_accuracy']:.3f}), {w['classification_queries']} classification "
                 "queries" + (f" (held-out continent accuracy {w['classifier_heldout_accuracy']:.3f})"
                              if w.get("classifier_heldout_accuracy") is not None else "") + ".")
    if w.get("hard"):
        h = w["hard"]
        lines.append(f"Hard world: {h['share_sources_without_subject_name']:.0%} of the source documents do not name the "
                     f"fact's subject, {h['share_statements_without_name_or_question_words']:.0%} of the stating sentences "
                     "have neither the subject's name nor a word of the question; every fact has a negation and a "
                     "near-miss among its hard negatives (msif.worldfacts.hard).")
    tr = res["trials"]
    lines.append(f"{tr['n']} trials; queries per trial: " + ", ".join(f"{t}: {v}" for t, v in tr["queries_per_trial"].items())
                 + f". Trials vary: {tr['what_varies']}. Cells are mean ± sample std over trials.")
    eig = res["mean_eigenvalue"]
    lines.append("Damping: " + res["damping_note"] + ". Mean eigenvalues: "
                 + ", ".join(f"{n} {v:.3g}" for n, v in eig.items() if v) + ".")
    lines.append(f"Metrics: MRR (reciprocal rank of the first gold document, 0 when none is a candidate); "
                 f"R@{k} any = a gold document in the top {k}; R@{k} frac = share of the fact's gold documents in the "
                 f"top {k} (denominator: all its sources, also those outside the candidates). Ties rank gold last.")
    lines.append("")
    lines.append("Damping equivalents per factor set (absolute λ / multiple of the mean eigenvalue):")
    lines.append("")
    eq = res["damping_equivalents"]
    lines.append("| damping | " + " | ".join(f"{n}: λ / (λ ÷ mean eig)" for n in eq) + " |")
    lines.append("|---|" + "---|" * len(eq))
    for i, lam in enumerate(res["dampings"]):
        lines.append(f"| {_fmt_damping(lam)} | " + " | ".join(
            f"{eq[n][i]['absolute']:.3g} / {eq[n][i]['relative']:.3g}" for n in eq) + " |")
    lines.append("")
    for task in dict.fromkeys(r["task"] for r in res["results"]):
        cr = res["candidate_recall"].get(task)
        for setting in SETTINGS:
            rows = [r for r in res["results"] if r["task"] == task and r["setting"] == setting]
            if not rows:
                continue
            lines.append(f"## {_TASK_NAMES.get(task, task)}, {_SETTING_NAMES[setting]}")
            lines.append("")
            if setting == "knn" and cr:
                lines.append(f"Gold documents among the {cr['k']} nearest neighbours (caps every reranker): "
                             f"{fmt_mean_std(cr['mean_fraction_of_gold']['mean'], cr['mean_fraction_of_gold']['std'])} "
                             f"of a fact's sources on average; at least one for "
                             f"{fmt_mean_std(cr['any_gold']['mean'], cr['any_gold']['std'])} of the queries.")
            else:
                lines.append(f"Pool: every gold document + top {cfg['pool_bm25']} BM25 hits + random documents, "
                             f"{cfg['pool_size']} in all.")
            lines.append("")
            lines.append(f"| method | λ | MRR | R@{k} any | R@{k} frac |")
            lines.append("|---|---|---|---|---|")
            for r in rows:
                lines.append(f"| {r['method']} | {_fmt_damping(r['damping'])} | "
                             + " | ".join(fmt_mean_std(r[m]['mean'], r[m]['std'])
                                          for m in ("mrr", f"recall_any@{k}", f"recall_frac@{k}")) + " |")
            ch = [c for c in res["chance"] if c["task"] == task and c["setting"] == setting]
            if ch:
                c = ch[0]
                lines.append("| chance (expected) | – | " + " | ".join(
                    fmt_mean_std(c[m]["mean"], c[m]["std"]) for m in ("mrr", f"recall_any@{k}", f"recall_frac@{k}")) + " |")
            lines.append("")
    lines.append("## Best damping per method (by mean MRR)")
    lines.append("")
    lines.append("| task | setting | method | best λ | MRR |")
    lines.append("|---|---|---|---|---|")
    for b in res["best_damping"]:
        lines.append(f"| {b['task']} | {b['setting']} | {b['method']} | {_fmt_damping(b['damping'])} | "
                     f"{fmt_mean_std(b['mrr']['mean'], b['mrr']['std'])} |")
    lines.append("")
    lines.append("MS-IF at its best damping beats SS-IF, GDP and RepSim on MRR: " + ", ".join(
        f"{k}: {'yes' if v['ms-if_beats_all'] else 'no'}" for k, v in res["verdict"].items()) + ".")
    lines.append("")
    lines.append("Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in res["timings_s"].items()) + ".")
    for name, summ in (res.get("refine_query") or {}).items():
        if summ:
            lines.append(f"Refined query vectors ({name}, {summ['iterations']} CG steps per stage): " + "; ".join(
                f"{st} {s['products_per_query']:.0f} GGN-vector products and {s['seconds_per_query']:.2f} s per query vector "
                f"({s['train_steps_per_query']:.1f} training steps over {s['gvp_examples']} examples), largest relative "
                f"residual {s['max_relative_residual']:.2e}" for st, s in summ["stages"].items()) + ".")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: str | Path) -> Path:
    """MRR and Recall@k against damping (log scale), like the paper's Figure 3: one row per task and
    candidate setting; damped methods as lines with ± std bands, undamped ones as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = res["config"]["k"]
    metrics = [("mrr", "MRR"), (f"recall_any@{k}", f"Recall@{k} (any)"), (f"recall_frac@{k}", f"Recall@{k} (fraction)")]
    panels = [(t, s) for t in dict.fromkeys(r["task"] for r in res["results"]) for s in SETTINGS
              if any(r["task"] == t and r["setting"] == s for r in res["results"])]
    fig, axes = plt.subplots(len(panels), len(metrics), figsize=(4.2 * len(metrics), 3.2 * len(panels)), squeeze=False)
    lams = np.array([_damping_value(x) for x in res["dampings"]])
    relative_mode = res.get("damping_mode") == "relative"
    colors = {"ms-if": "C3", "ss-if": "C0", "gdp": "C2", "repsim": "C4", "bm25": "C1", "embedding": "C5",
              "random": "0.5"}
    for i, (task, setting) in enumerate(panels):
        rows = [r for r in res["results"] if r["task"] == task and r["setting"] == setting]
        for j, (m, label) in enumerate(metrics):
            ax = axes[i][j]
            for method in dict.fromkeys(r["method"] for r in rows):
                rr = [r for r in rows if r["method"] == method]
                mean = np.array([r[m]["mean"] for r in rr])
                std = np.array([r[m]["std"] for r in rr])
                c = colors.get(method)
                if rr[0]["damping"] is None:
                    ax.axhline(mean[0], color=c, ls="--" if method != "random" else ":", lw=1.2, label=method)
                else:
                    x = np.array([_damping_value(r["damping"]) for r in rr])
                    ax.plot(x, mean, "o-", color=c, label=method, ms=3)
                    ax.fill_between(x, mean - std, mean + std, color=c, alpha=0.2)
            ax.set_xscale("log")
            ax.set_xlim(lams.min() / 2, lams.max() * 2)
            ax.set_ylim(0, 1.02)
            ax.set_xlabel("damping (× mean eigenvalue of each factor set)" if relative_mode else "damping λ (absolute)")
            ax.set_title(f"{task} / {setting}: {label}", fontsize=9)
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(res: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``fact_tracing.json``, ``fact_tracing.md`` and ``fact_tracing.png`` into ``out_dir``."""
    return _write_outputs(res, out_dir, "fact_tracing", markdown, plot)
