"""Multi-stage linear datamodeling score: do the scores predict what *pre-training* on a subset does to
the *fine-tuned* model?

The LDS (Park et al. 2023, :mod:`msif.eval.lds`) retrains on random subsets and asks whether the
summed scores of a subset predict the retrained model's query losses. Here the subset is of the
pre-training corpus and the fine-tuning stays fixed, which is the question multi-stage attribution
answers:

1. on a small world (the tiny preset: a few hundred documents; pre-training and fine-tuning take
   seconds), score every (query, document) pair with each method on the world's own θ_pt / θ_ft;
2. draw ``n_subsets`` random subsets ``S_k`` of ``fraction`` of the pre-training documents; pre-train on
   each from the world's initialisation, data-order seed and schedule
   (:func:`msif.worldfacts.build.pretrain_lm`), then run the world's own QA fine-tuning on the result
   (:func:`msif.worldfacts.build.finetune_qa`, same data, order and seed), and measure every query's
   loss ``m(q) = −log p(answer | prompt)``;
3. LDS of a query: the Spearman correlation over subsets between ``Σ_{z ∈ S_k} τ(q, z)`` and ``−m(q)``,
   averaged over the queries (all held-out QA facts: they are learnt in pre-training only).

Methods: ``ms-if`` (both stages, λ relative to each factor set), ``ss-if`` (θ_ft alone), ``gdp``,
``repsim`` and ``trak`` (TRAK with one model: candidates' projected margin gradients on θ_pt, the
query's on θ_ft, the kernel of θ_pt's features; :mod:`msif.baselines.trak`), and ``bm25`` (the BM25 score
of the question + answer against each document: a word count, not a model). MS-IF and SS-IF are also
reported at the dampings of ``dampings``; ``sources`` (1 for the documents that state the fact, 0
otherwise) is the reference of fact tracing's ground truth read as scores. The cost of each method's
scores and of the retraining is reported.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

METHODS = ("ms-if", "ss-if", "gdp", "repsim", "trak", "bm25")
DAMPED = ("ms-if", "ss-if")


@dataclass
class MSLDSConfig:
    size: str = "tiny"  # world size preset (the LDS needs retraining: keep it small)
    world: str = "standard"
    world_seed: int = 0
    n_subsets: int = 64
    fraction: float = 0.5
    damping: str = "0.1x"  # the headline λ of ms-if / ss-if (both stages, relative to each factor set)
    dampings: tuple = ("0.01x", "1x", "10x")  # also reported, as "ms-if λ=1x" etc.
    trak_dim: int = 128
    methods: tuple = METHODS
    seed: int = 0
    batch_size: int = 32
    fit_batch_size: int = 16
    max_fit_examples: int | None = None
    refine: int = 0
    workers: int = 2
    threads: int = 2
    quick: bool = False


def quick_config(**overrides) -> MSLDSConfig:
    return replace(MSLDSConfig(n_subsets=16, quick=True), **overrides)


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[ms-lds] {msg}", file=sys.stderr, flush=True)


def score_matrices(world, facts: list, cfg: MSLDSConfig, cache: Path, progress: bool) -> tuple[dict, dict]:
    """Per method the ``(queries, documents)`` score matrix on the world's own models, and its seconds."""
    from ..retrieval import BM25Index
    from ..retrieval.candidates import query_text, score_matrix
    from .tail_patch import world_attributor

    docs = world.documents
    texts = [d["text"] for d in docs]
    N = len(texts)
    out, secs = {}, {}
    att, prepared = world_attributor(world, facts, cfg, 0, cache, progress)
    row_of = {d["id"]: i for i, d in enumerate(docs)}
    gold = np.zeros((len(facts), N))
    for i, f in enumerate(facts):
        gold[i, [row_of[s] for s in f.sources]] = 1.0
    out["sources"], secs["sources"] = gold, 0.0  # the reference: 1 for the documents that state the fact
    lams = list(dict.fromkeys((cfg.damping, *cfg.dampings)))  # the headline damping first, then the sweep
    for method in cfg.methods:
        t0 = time.perf_counter()
        if method in DAMPED:
            for lam in lams:  # one attributor: the damping is an argument of each call
                key = method if lam == cfg.damping else f"{method} λ={lam}"
                out[key], secs[key] = _attributed(att, prepared, texts, method, lam), time.perf_counter() - t0
                t0 = time.perf_counter()
            _log(f"{method}: {len(facts)} × {N} scores at λ = {', '.join(lams)}", progress)
            continue
        if method == "bm25":
            hits = BM25Index.build(texts, doc_ids=[d["id"] for d in docs]).search([query_text(f.question, f.answer) for f in facts], k=N)
            M = score_matrix(hits, N)
        elif method == "trak":
            M = _trak(att, prepared, texts, cfg)
        else:
            M = _attributed(att, prepared, texts, method)
        out[method], secs[method] = M, time.perf_counter() - t0
        _log(f"{method}: {len(facts)} × {N} scores ({secs[method]:.1f}s)", progress)
    return out, secs


def _attributed(att, prepared, texts, method: str, damping=None) -> np.ndarray:
    """Every document's score for every query, ``(queries, documents)`` (``damping``: both stages'; default
    the attributor's)."""
    res = att.attribute(prepared, texts, method=method, top=len(texts), per_token=False, damping_ft=damping, damping_pt=damping)
    M = np.zeros((len(prepared), len(texts)))
    for i, (rows, sc) in enumerate(zip(res.rows, res.scores)):
        M[i, rows] = sc
    return M


def _trak(att, prepared, texts, cfg: MSLDSConfig) -> np.ndarray:
    """One-model TRAK across the stages: training features on θ_pt, query features on θ_ft."""
    from ..baselines.trak import Projector, TrakFeatures, featurize, trak_scores
    from ..curvature.exact import param_layout
    from ..data.encoding import collate, pad_token_id

    pad = pad_token_id(att.tok)
    enc = att.encode_candidates(texts, range(len(texts)))
    train = [collate(enc[i : i + cfg.batch_size], pad_id=pad) for i in range(0, len(enc), cfg.batch_size)]
    queries = [collate([p.encoded for p in prepared[i : i + cfg.batch_size]], pad_id=pad) for i in range(0, len(prepared), cfg.batch_size)]
    proj = Projector(param_layout(att.shared).D, cfg.trak_dim, "rademacher", seed=cfg.seed)
    pt = featurize(att.pt, att.shared, train, [], proj)
    ft = featurize(att.ft, att.shared, [], queries, proj)
    return trak_scores([TrakFeatures(pt.train, pt.q_train, ft.queries)]).numpy()


class _Worker:
    state: dict = {}

    @classmethod
    def init(cls, world_path: str, pairs: list[tuple[str, str]]) -> None:
        from ..data.encoding import encode_prompt_answer, pad_token_id
        from ..worldfacts import World

        torch.set_num_threads(1)
        world = World(world_path)
        tok = world.load_tokenizer()
        cls.state = dict(world=world, pad=pad_token_id(tok),
                         queries=[encode_prompt_answer(tok, p, a, index=i) for i, (p, a) in enumerate(pairs)])

    @classmethod
    def run(cls, job: tuple[int, list[int]]) -> tuple[int, np.ndarray]:
        """``(subset index, its rows)`` → ``(index, query losses of the model pre-trained on them and fine-tuned)``."""
        from ..worldfacts.build import finetune_qa, pretrain_lm
        from .tail_patch import answer_logprobs

        k, rows = job
        st = cls.state
        model = pretrain_lm(st["world"], rows)
        finetune_qa(st["world"], model)
        return k, -answer_logprobs(model, st["queries"], st["pad"])


def run_ms_lds(config: MSLDSConfig | None = None, world=None, cache_dir=None, progress: bool = True) -> dict:
    import multiprocessing as mp

    from .lds import lds

    cfg = config or MSLDSConfig()
    t_start = time.perf_counter()
    if world is None:
        from ..worldfacts import load_world

        world = load_world(seed=cfg.world_seed, size=cfg.size, world=cfg.world, progress=progress)
    cache = Path(cache_dir or "runs/ms-lds/cache") / f"world-{world.meta.get('hash', world.path.name)}"
    cache.mkdir(parents=True, exist_ok=True)
    facts = sorted(world.heldout_facts, key=lambda f: f.id)
    old = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        scores, secs = score_matrices(world, facts, cfg, cache, progress)
    finally:
        torch.set_num_threads(old)
    N = len(world.documents)
    rng = np.random.default_rng([cfg.seed, 53])
    masks = np.zeros((cfg.n_subsets, N))
    for k in range(cfg.n_subsets):
        masks[k, rng.choice(N, int(round(cfg.fraction * N)), replace=False)] = 1
    losses = np.zeros((cfg.n_subsets, len(facts)))
    t0 = time.perf_counter()
    pairs = [(world.qa_prompt(f.question), f.answer) for f in facts]
    with ProcessPoolExecutor(max(1, cfg.workers), mp_context=mp.get_context("spawn"), initializer=_Worker.init,
                             initargs=(str(world.path), pairs)) as pool:
        for i, (k, m) in enumerate(pool.map(_Worker.run, [(k, np.flatnonzero(masks[k]).tolist()) for k in range(cfg.n_subsets)])):
            losses[k] = m
            if progress and (i + 1) % max(1, cfg.n_subsets // 8) == 0:
                _log(f"{i + 1}/{cfg.n_subsets} subsets pre-trained and fine-tuned ({time.perf_counter() - t0:.0f}s)", progress)
    retrain = time.perf_counter() - t0
    Mk, Lk = torch.from_numpy(masks), torch.from_numpy(losses)
    results = {m: lds(torch.from_numpy(S), Mk, Lk) for m, S in scores.items()}
    return dict(
        benchmark="ms-lds", config=asdict(cfg),
        world={"path": str(world.path), "size": world.meta.get("size"), "variant": cfg.world, "hash": world.meta.get("hash"),
               "documents": N, "queries": len(facts)},
        methods={m: {**r, "score_seconds": round(secs[m], 2)} for m, r in results.items()},
        query_loss_spread=float(losses.std(0).mean()),
        queries=[f.id for f in facts], masks=masks.astype(int).tolist(), losses=losses.tolist(),
        scores={m: S.tolist() for m, S in scores.items()},
        cost=dict(retraining_s=round(retrain, 1), per_subset_s=round(retrain * max(1, cfg.workers) / cfg.n_subsets, 2),
                  total_s=round(time.perf_counter() - t_start, 1)),
    )


def markdown(res: dict) -> str:
    cfg, w, c = res["config"], res["world"], res["cost"]
    lines = [f"# Multi-stage LDS ({w['variant']} world, {w['size']}: {w['documents']} documents, {w['queries']} queries)", "",
             f"{cfg['n_subsets']} random {cfg['fraction']:.0%} subsets of the pre-training corpus, each pre-trained from the "
             f"world's initialisation and then fine-tuned with the world's own QA run; LDS = Spearman over subsets of the "
             f"summed scores vs −query loss, mean ± std over queries. Retraining {c['retraining_s']:.0f} s "
             f"({c['per_subset_s']:.1f} s per subset and process); λ = {cfg['damping']}.", "",
             "| method | LDS | scores (s) |", "|---|---|---|"]
    for m, r in sorted(res["methods"].items(), key=lambda x: -x[1]["mean"]):
        name = "sources (reference: 1 if the document states the fact)" if m == "sources" else m
        lines.append(f"| {name} | {r['mean']:.3f} ± {r['std']:.3f} | {r['score_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(((m, r) for m, r in res["methods"].items() if "λ=" not in m), key=lambda x: -x[1]["mean"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([m for m, _ in items], [r["mean"] for _, r in items], yerr=[r["std"] / np.sqrt(len(r["per_query"])) for _, r in items],
           capsize=4, color=["C0" if m == "ms-if" else "C7" for m, _ in items])
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel("LDS (mean over queries, ± s.e.)")
    ax.set_title(f"Multi-stage LDS ({res['world']['variant']} world, {res['config']['n_subsets']} subsets)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_outputs(res: dict, out_dir) -> dict[str, Path]:
    from .outputs import write_outputs as _write

    return _write(res, out_dir, "ms_lds", markdown, plot)
