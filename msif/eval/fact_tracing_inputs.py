"""The inputs of the fact-tracing benchmark (:mod:`msif.eval.fact_tracing`), one stage each, in the
order they run: the world and its models (:func:`setup`), the queries (:func:`queries`), their
model-free retrieval scores (:func:`retrieval`), the candidate sets of both settings
(:func:`candidate_sets`) and the curvature factors of every trial (:func:`factor_sets`)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .timer import Timings

if TYPE_CHECKING:
    from .fact_tracing import FactTracingConfig


def log(msg: str, progress: bool):
    if progress:
        print(f"[fact-tracing] {msg}", file=sys.stderr, flush=True)


@dataclass
class FactQuery:
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
class Setup:
    """What every stage reads: the config, the world, its documents, models and cache folder."""

    cfg: FactTracingConfig
    world: object
    cache: Path
    texts: list[str]
    row_of: dict[str, int]
    dampings: list
    trials: list[int]
    models: dict = field(default_factory=dict)  # tok, pt, ft, clf
    timings: Timings = field(default_factory=Timings)
    progress: bool = True

    @property
    def n_docs(self) -> int:
        return len(self.texts)


def setup(cfg: FactTracingConfig, world, cache_dir, progress: bool, dampings: list) -> Setup:
    """Load the world (unless given) and its models; the cache folder of this world."""
    from ..models.loading import load_model, load_tokenizer

    T = Timings()
    if world is None:
        from ..worldfacts import load_world

        with T("world"):
            world = load_world(seed=cfg.world_seed, size=cfg.size, progress=progress, world=cfg.world)
    if world.kind != cfg.world:
        raise ValueError(f"the world given is the {world.kind} world, but the configuration asks for the {cfg.world} one")
    cache = Path(cache_dir) if cache_dir is not None else Path("runs/fact-tracing/cache")
    cache = cache / f"world-{world.meta.get('hash', world.path.name)}"
    cache.mkdir(parents=True, exist_ok=True)
    log(f"{world.kind} world {world.path} ({world.meta['stats']['documents']} documents, {len(world.test_facts)} test facts); "
         f"cache {cache}", progress)
    docs = world.documents
    s = Setup(cfg, world, cache, [d["text"] for d in docs], {d["id"]: i for i, d in enumerate(docs)},
               dampings, list(range(cfg.trials)), timings=T, progress=progress)
    with T("load models"):
        s.models = dict(tok=load_tokenizer(str(world.pretrained_dir)),
                        pt=load_model(str(world.pretrained_dir), task="causal_lm"),
                        ft=load_model(str(world.finetuned_dir), task="causal_lm"),
                        clf=load_model(str(world.classifier_dir), task="auto") if cfg.classification else None)
    return s


@dataclass
class Queries:
    """The queries of each task (``qa``, and ``cls`` when classification queries exist), each trial's subset."""

    tasks: dict[str, list[FactQuery]]
    trial_q: dict[str, dict[int, list[int]]]
    n_qa: int
    n_cls: int
    cls_accuracy: float | None


def queries(s: Setup) -> Queries:
    """QA test facts; with classification, the held-out continent facts the classifier predicts right."""
    from ..influence.attribute import Attributor, Query

    cfg, world = s.cfg, s.world

    def gold(f):
        return np.array(sorted(s.row_of[x] for x in f.sources), np.int64)

    qa_all = [FactQuery(f.id, "qa", world.qa_prompt(f.question), f.answer, None, _query_text(f), gold(f), len(f.sources))
              for f in sorted(world.test_facts, key=lambda f: f.id)]
    cls_all: list[FactQuery] = []
    cls_accuracy = None
    if cfg.classification:
        with s.timings("classifier predictions"):
            cand = sorted((f for f in world.heldout_facts if f.relation == "continent"), key=lambda f: f.id)
            probe = Attributor(s.models["pt"], s.models["clf"], s.models["tok"], check_fingerprints=False)
            if cand:
                prep = probe.prepare([Query(prompt=f.question, label=None, id=f.id) for f in cand])
                for f, p in zip(cand, prep):
                    if world.continent_labels[p.label] == f.object:
                        cls_all.append(FactQuery(f.id, "cls", f.question, None, p.label, _query_text(f), gold(f), len(f.sources)))
            cls_accuracy = len(cls_all) / max(1, len(cand))
    log(f"queries: {len(qa_all)} QA test facts, {len(cls_all)} classification facts", s.progress)
    if not qa_all:
        raise ValueError(f"the world {world.path} has no QA test facts (held-out facts the fine-tuned model answers "
                         "correctly): nothing to trace")
    tasks = {"qa": qa_all}
    if cfg.classification and cls_all:
        tasks["cls"] = cls_all

    def subset(all_q: list[FactQuery], t: int) -> list[int]:
        n = len(all_q)
        if cfg.n_queries >= n:
            return list(range(n))
        rng = np.random.default_rng([cfg.seed, t, 17])
        return sorted(rng.choice(n, cfg.n_queries, replace=False).tolist())

    trial_q = {task: {t: subset(qs, t) for t in s.trials} for task, qs in tasks.items()}
    return Queries(tasks, trial_q, len(qa_all), len(cls_all), cls_accuracy)


def _query_text(fact) -> str:
    from ..retrieval.candidates import query_text

    return query_text(fact.question, fact.answer)


@dataclass
class Retrieval:
    """Model-free, trial-free scores of every query of a task against every document, and its knn rows."""

    embedding: dict[str, np.ndarray]
    bm25: dict[str, np.ndarray]
    knn: dict[str, np.ndarray]


def retrieval(s: Setup, q: Queries) -> Retrieval:
    from ..retrieval import BM25Index
    from ..retrieval.candidates import cached_index, score_matrix

    T = s.timings
    with T("embedding index"):
        index = cached_index(s.world.corpus_path, s.cache / "index", keep_embeddings=True)
        E = np.load(s.cache / "index" / "embeddings.npy").astype(np.float32)
    with T("bm25 index"):
        bm25 = BM25Index.build(s.texts, doc_ids=[d["id"] for d in s.world.documents])
    out = Retrieval({}, {}, {})
    with T("retrieval"):
        for task, qs in q.tasks.items():
            qtexts = [x.retrieval_text for x in qs]
            qe = index.encoder.encode(qtexts)
            out.embedding[task] = (qe @ E.T).astype(np.float64)
            out.knn[task] = index.search_vectors(qe, s.cfg.k_candidates).rows
            out.bm25[task] = score_matrix(bm25.search(qtexts, k=s.n_docs), s.n_docs)
    return out


@dataclass
class CandidateSets:
    """Per (task, setting, trial, query index) the candidate rows; per task and trial the knn recall."""

    rows: dict[tuple, np.ndarray]
    recall: dict[str, dict[int, list]]


def rerank_pool(q: FactQuery, bm25_row: np.ndarray, cfg: FactTracingConfig, n_docs: int, rng) -> np.ndarray:
    """The fixed rerank pool of one query: its gold documents, the top BM25 hits, random fill, shuffled."""
    pool = list(q.gold.tolist())
    for r in np.argsort(-bm25_row, kind="stable")[: cfg.pool_bm25].tolist():
        if bm25_row[r] > 0 and r not in pool:
            pool.append(r)
    chosen = set(pool)
    need = max(0, min(cfg.pool_size, n_docs) - len(pool))
    if need:
        rest = np.array([r for r in range(n_docs) if r not in chosen], np.int64)
        pool += rng.choice(rest, min(need, len(rest)), replace=False).tolist()
    pool = np.array(pool, np.int64)
    rng.shuffle(pool)
    return pool


def candidate_sets(s: Setup, q: Queries, r: Retrieval) -> CandidateSets:
    out = CandidateSets({}, {})
    for task, qs in q.tasks.items():
        out.recall[task] = {}
        for t in s.trials:
            rng = np.random.default_rng([s.cfg.seed, t, 29, 0 if task == "qa" else 1])
            rec = []
            for qi in q.trial_q[task][t]:
                rows = r.knn[task][qi]
                rows = rows[rows >= 0]
                out.rows[(task, "knn", t, qi)] = rows
                n_in = int(np.isin(qs[qi].gold, rows).sum())
                rec.append((n_in / qs[qi].n_gold, float(n_in > 0)))
                out.rows[(task, "pool", t, qi)] = rerank_pool(qs[qi], r.bm25[task][qi], s.cfg, s.n_docs, rng)
            out.recall[task][t] = rec
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


def factor_sets(s: Setup, q: Queries) -> tuple[dict, dict]:
    """Every factor set of every trial (fitted with label-sampling seed t, or loaded from the cache),
    and their mean eigenvalues: ``fits[(name, t)]``, ``mean_eig[name][t]``."""
    import time

    world, fits, mean_eig = s.world, {}, {"pt": {}, "ft": {}, "cls": {}}
    specs = [("pt", world.pretrained_dir, world.corpus_path, "lm"), ("ft", world.finetuned_dir, world.qa_finetune_path, "answer")]
    if "cls" in q.tasks:
        specs.append(("cls", world.classifier_dir, world.cls_finetune_path, "classification"))
    with s.timings("factors"):
        for t in s.trials:
            for name, mdir, data, obj in specs:
                t0 = time.perf_counter()
                tag = f"{name}-seed{t}" + (f"-refine{s.cfg.refine}" if s.cfg.refine else "")
                fs, fresh = fit_or_load(s.cache / "factors" / tag, mdir, data, obj, t, s.cfg, s.progress)
                fits[(name, t)], mean_eig[name][t] = fs, fs.mean_eigenvalue()
                log(f"factors {name} seed {t}: {'fitted' if fresh else 'loaded'} in {time.perf_counter() - t0:.1f}s, "
                     f"mean eigenvalue {mean_eig[name][t]:.3g}", s.progress)
    return fits, mean_eig
