"""Multi-stage tail-patch: do a method's top documents *cause* the fine-tuned model's answer?

Fact tracing asks whether a method ranks the documents that state a fact first; in the bundled world
that is a lexical question (BM25 wins). Tail-patching (Chang et al. 2024, TrackStar) asks what
training on a method's top documents *does* to the prediction; here through both stages:

1. for a test fact ``q`` (a held-out fact the QA fine-tune answers right: learnt in pre-training
   only) and a method, take the method's top-``k`` pre-training documents ``D_q``;
2. patch θ_pt with one gradient step of fixed size on their mean next-token loss
   (``θ_pt' = θ_pt − step · ‖θ_pt‖ · ∇L(D_q) / ‖∇L(D_q)‖``; see :func:`patch` for why the size is fixed
   rather than the learning rate);
3. redo the world's own QA fine-tuning from θ_pt' (same data, order, seed and schedule:
   :func:`msif.worldfacts.build.finetune_qa`, bit for bit the world's fine-tune from an unpatched θ_pt);
4. the effect is ``Δ_q = log p(answer | prompt; θ_ft') − log p(answer | prompt; θ_ft)``.

One re-fine-tuning per (query, method, k) is too many (a fine-tune of the full world takes seconds, and
the benchmark needs thousands), so queries are patched in **groups**: a trial's queries are split at
random into ``groups`` groups, and one patch carries the documents of every query of a group (the sum of
their per-query losses: each query's step is the one it would get alone). Every patched model is then
measured on *all* the trial's queries, and a query's effect is its change under its own group's patch
minus the mean change under the other groups' patches (of the same method and ``k``, the same size):
what the query's own documents do beyond the drift any such patch causes. The random-documents control
measures what is left of that drift (it should sit at zero).

Methods: ``ms-if``, ``ss-if``, ``gdp``, ``repsim`` (whole-corpus rankings from
:class:`msif.influence.Attributor`), ``bm25`` and ``embedding`` (the query's question + answer against
the corpus), ``random`` documents and the ``gold`` sources (the documents that state the fact, in a
seeded order; ``k`` of them, or all when a fact has fewer). Effects are reported per ``k`` as mean ± std
over trials (each the mean over its queries) and as a fraction of the gold sources' effect.

Trials vary the query subset, the grouping, the random documents and the label-sampling seed of the
curvature fits. :func:`run_tail_patch` returns a JSON-serialisable dict; :func:`write_outputs` writes
it as JSON, a markdown table and a plot of the effect against ``k``.
"""

from __future__ import annotations

import copy
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .metrics import fmt_mean_std, summarize

METHODS = ("ms-if", "ss-if", "gdp", "repsim", "bm25", "embedding", "random", "gold")
ATTRIBUTOR_METHODS = ("ms-if", "ss-if", "gdp", "repsim")


@dataclass
class TailPatchConfig:
    """Settings of the benchmark (defaults: the full run; :func:`quick_config` for the test suite)."""

    size: str = "full"  # world size preset
    world: str = "standard"  # world variant (standard | hard)
    world_seed: int = 0
    trials: int = 3
    n_queries: int = 100  # per trial (all test facts when there are fewer)
    ks: tuple = (3, 10)  # documents patched per query
    step: float = 0.003  # each query's patch: ‖Δθ_pt‖ = step · ‖θ_pt‖ along −∇ L(its documents)
    groups: int = 6  # patches per (method, k, trial); queries are split into this many groups
    damping: str = "0.1x"  # λ of ms-if / ss-if (both stages), relative to each factor set's mean eigenvalue
    methods: tuple = METHODS
    seed: int = 0
    batch_size: int = 32  # candidates per forward/backward when ranking
    fit_batch_size: int = 16
    max_fit_examples: int | None = None
    refine: int = 0
    workers: int = 2  # processes re-fine-tuning in parallel (one thread each)
    threads: int = 2  # torch threads for the rankings
    quick: bool = False


def quick_config(**overrides) -> TailPatchConfig:
    """The quick mode: the tiny world, k ∈ {1, 3}, 2 trials, 3 groups (a minute or two on two CPU cores)."""
    return replace(TailPatchConfig(size="tiny", trials=2, ks=(1, 3), groups=3, quick=True), **overrides)


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[tail-patch] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ rankings


def _queries(world, cfg: TailPatchConfig, trial: int) -> list:
    facts = sorted(world.test_facts, key=lambda f: f.id)
    if cfg.n_queries >= len(facts):
        return facts
    rng = np.random.default_rng([cfg.seed, trial, 17])
    return [facts[i] for i in sorted(rng.choice(len(facts), cfg.n_queries, replace=False).tolist())]


def rankings(world, facts: list, cfg: TailPatchConfig, trial: int, cache: Path, progress: bool) -> dict[str, list[np.ndarray]]:
    """Per method, each query's top ``max(ks)`` corpus rows (best first)."""
    from ..retrieval import BM25Index
    from ..retrieval.candidates import query_text

    docs = world.documents
    texts = [d["text"] for d in docs]
    row_of = {d["id"]: i for i, d in enumerate(docs)}
    k = max(cfg.ks)
    search = [query_text(f.question, f.answer) for f in facts]
    rng = np.random.default_rng([cfg.seed, trial, 41])
    out: dict[str, list[np.ndarray]] = {}
    if "gold" in cfg.methods:
        out["gold"] = [rng.permutation(np.array(sorted(row_of[s] for s in f.sources), np.int64))[:k] for f in facts]
    if "random" in cfg.methods:
        out["random"] = [rng.choice(len(docs), k, replace=False) for _ in facts]
    if "bm25" in cfg.methods:
        hits = BM25Index.build(texts, doc_ids=[d["id"] for d in docs]).search(search, k=k)
        out["bm25"] = [r[r >= 0] for r in hits.rows]
    if "embedding" in cfg.methods:
        out["embedding"] = [r[r >= 0] for r in _embedding_index(world, cache).search(search, k=k).rows]
    wanted = [m for m in ATTRIBUTOR_METHODS if m in cfg.methods]
    if wanted:
        att, prepared = world_attributor(world, facts, cfg, trial, cache, progress)
        for method in wanted:
            t0 = time.perf_counter()
            res = att.attribute(prepared, texts, method=method, top=k, per_token=False, progress=False)
            out[method] = [np.asarray(r, np.int64) for r in res.rows]
            _log(f"trial {trial}: {method} ranked {len(docs)} documents for {len(facts)} queries "
                 f"({time.perf_counter() - t0:.1f}s)", progress)
    return {m: out[m] for m in cfg.methods}


def world_attributor(world, facts: list, cfg, seed: int, cache: Path, progress: bool):
    """An :class:`~msif.influence.Attributor` of the world's θ_pt / θ_ft with factors fitted (or loaded from
    ``cache``) with label-sampling seed ``seed`` and damping ``cfg.damping`` on both stages, and the facts
    prepared as its QA queries."""
    from ..influence.attribute import Attributor, Query
    from ..models.loading import load_model, load_tokenizer
    from .fact_tracing import fit_or_load

    fits = {}
    for name, mdir, data, obj in (("pt", world.pretrained_dir, world.corpus_path, "lm"),
                                  ("ft", world.finetuned_dir, world.qa_finetune_path, "answer")):
        tag = f"{name}-seed{seed}" + (f"-refine{cfg.refine}" if cfg.refine else "")
        fits[name], _ = fit_or_load(cache / "factors" / tag, mdir, data, obj, seed, cfg, progress)
    att = Attributor(load_model(str(world.pretrained_dir), task="causal_lm"), load_model(str(world.finetuned_dir), task="causal_lm"),
                     load_tokenizer(str(world.pretrained_dir)), fits["pt"], fits["ft"], damping_pt=cfg.damping,
                     damping_ft=cfg.damping, batch_size=cfg.batch_size)
    return att, att.prepare([Query(prompt=world.qa_prompt(f.question), answer=f.answer, id=f.id) for f in facts])


def _embedding_index(world, cache: Path):
    from ..retrieval.candidates import cached_index

    return cached_index(world.corpus_path, cache / "index")


# ------------------------------------------------------------------------------------ patch + refine-tune


class _Worker:
    """What one re-fine-tuning process holds: θ_pt, the tokenised corpus, the fine-tuning data, the queries."""

    state: dict = {}

    @classmethod
    def init(cls, world_path: str, step: float, queries: dict[int, list[tuple[str, str]]]) -> None:
        from ..data.encoding import encode_prompt_answer, encode_text, pad_token_id
        from ..worldfacts import World

        torch.set_num_threads(1)
        world = World(world_path)
        tok = world.load_tokenizer()
        ctx = world.meta["config"]["max_positions"]
        cls.state = dict(world=world, tok=tok, pad=pad_token_id(tok), step=step, pt=world.load_pretrained(),
                         docs=[encode_text(tok, d["text"], max_length=ctx, index=i) for i, d in enumerate(world.documents)],
                         queries={t: [encode_prompt_answer(tok, p, a, index=i) for i, (p, a) in enumerate(qs)]
                                  for t, qs in queries.items()})

    @classmethod
    def run(cls, job: tuple[tuple, list[list[int]]]) -> tuple[tuple, np.ndarray, float]:
        """``((trial, …), the rows of each query of the group)`` → ``(key, log p(answer) of every query of the
        trial after it, the patch's relative size ‖Δθ_pt‖ / ‖θ_pt‖)``."""
        from ..worldfacts.build import finetune_qa

        key, groups = job
        st = cls.state
        model = patch(st["pt"], [[st["docs"][r] for r in rows] for rows in groups], st["step"], st["pad"])
        step = _relative_change(model, st["pt"])
        finetune_qa(st["world"], model)
        return key, answer_logprobs(model, st["queries"][key[0]], st["pad"]), step


def _relative_change(model, ref) -> float:
    """‖θ − θ_ref‖ / ‖θ_ref‖ over all parameters."""
    with torch.no_grad():
        d = sum(float((a - b).double().pow(2).sum()) for a, b in zip(model.parameters(), ref.parameters()))
        n = sum(float(b.double().pow(2).sum()) for b in ref.parameters())
    return (d / n) ** 0.5


def patch(pt, doc_groups: list[list], step: float, pad: int):
    """A copy of ``pt`` moved, for each group of documents, by ``step · ‖θ_pt‖`` along the negative gradient
    of the group's mean next-token loss (the steps of the groups add up).

    A step of fixed size rather than of fixed learning rate: the documents a model already fits well
    (a fact's sources, after pre-training) have small gradients, and a fixed learning rate would patch
    them less than random documents; every method's documents get the same step here, so the effect
    measures the direction. (AdamW, the world's pre-training optimiser, also takes steps whose size does
    not follow the gradient's.)"""
    from ..data.encoding import collate
    from ..objectives import data_targets, model_logits, summed_loss

    model = copy.deepcopy(pt).train()
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        size = step * float(torch.sqrt(sum(p.double().pow(2).sum() for p in params)))
    moves = [torch.zeros_like(p) for p in params]
    for docs in doc_groups:
        if not docs:
            continue
        b = collate(docs, pad_id=pad)
        tgt = data_targets(b, "lm")
        loss = summed_loss(model_logits(model, b), tgt).sum() / int((tgt != -100).sum())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        norm = float(torch.sqrt(sum(g.double().pow(2).sum() for g in grads)))
        for mv, g in zip(moves, grads):
            mv -= (size / max(norm, 1e-30)) * g
    with torch.no_grad():
        for p, mv in zip(params, moves):
            p += mv
    return model.eval()


@torch.no_grad()
def answer_logprobs(model, encoded: list, pad: int, batch_size: int = 64) -> np.ndarray:
    """``log p(answer | prompt)`` (summed over the answer tokens) of every encoded query, float64."""
    from ..data.encoding import collate
    from ..objectives import data_targets, model_logits, summed_loss

    model.eval()
    out = []
    for i in range(0, len(encoded), batch_size):
        b = collate(encoded[i : i + batch_size], pad_id=pad)
        out.append(-summed_loss(model_logits(model, b).double(), data_targets(b, "answer")))
    return torch.cat(out).numpy()


# ------------------------------------------------------------------------------------ the benchmark


def run_tail_patch(config: TailPatchConfig | None = None, world=None, cache_dir: str | Path | None = None,
                   progress: bool = True) -> dict:
    """Run the benchmark; returns the results dict (see :func:`write_outputs`)."""
    cfg = config or TailPatchConfig()
    old = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, world, cache_dir, progress)
    finally:
        torch.set_num_threads(old)


def _run(cfg: TailPatchConfig, world, cache_dir, progress: bool) -> dict:
    import multiprocessing as mp

    t_start = time.perf_counter()
    if world is None:
        from ..worldfacts import load_world

        world = load_world(seed=cfg.world_seed, size=cfg.size, world=cfg.world, progress=progress)
    if not world.test_facts:
        raise ValueError(f"the world {world.path} has no test facts: nothing to patch")
    cache = Path(cache_dir or "runs/tail-patch/cache") / f"world-{world.meta.get('hash', world.path.name)}"
    cache.mkdir(parents=True, exist_ok=True)
    timings = {"rankings": 0.0, "re-fine-tuning": 0.0}
    trials = []
    facts_of = {t: _queries(world, cfg, t) for t in range(cfg.trials)}
    queries = {t: [(world.qa_prompt(f.question), f.answer) for f in fs] for t, fs in facts_of.items()}
    # one pool for every trial: each worker loads the world and tokenises the corpus once
    with ProcessPoolExecutor(max(1, cfg.workers), mp_context=mp.get_context("spawn"), initializer=_Worker.init,
                             initargs=(str(world.path), cfg.step, queries)) as pool:
        for t, facts in facts_of.items():
            t0 = time.perf_counter()
            ranks = rankings(world, facts, cfg, t, cache, progress)
            timings["rankings"] += time.perf_counter() - t0
            group_of = np.random.default_rng([cfg.seed, t, 43]).permutation(len(facts)) % cfg.groups
            jobs = [((t, m, k, g), [ranks[m][i][:k].tolist() for i in np.flatnonzero(group_of == g)])
                    for m in cfg.methods for k in cfg.ks for g in range(cfg.groups)]
            jobs.append(((t, "base", 0, 0), []))
            t0 = time.perf_counter()
            lp, steps = {}, {}
            for i, (key, v, step) in enumerate(pool.map(_Worker.run, jobs)):
                lp[key[1:]], steps[key[1:]] = v, step
                if progress and (i + 1) % max(1, len(jobs) // 10) == 0:
                    _log(f"trial {t}: {i + 1}/{len(jobs)} patched fine-tunes ({time.perf_counter() - t0:.0f}s)", progress)
            timings["re-fine-tuning"] += time.perf_counter() - t0
            base = lp.pop(("base", 0, 0))
            trials.append(dict(facts=[f.id for f in facts], group=group_of.tolist(), base=base.tolist(),
                               patch_size={f"{m}@{k}": float(np.mean([steps[(m, k, g)] for g in range(cfg.groups)]))
                                           for m in cfg.methods for k in cfg.ks},
                               effects=_effects(lp, base, group_of, cfg),
                               docs={m: [r.tolist() for r in ranks[m]] for m in cfg.methods}))
            _log(f"trial {t}: {len(jobs)} fine-tunes in {time.perf_counter() - t0:.0f}s", progress)
    fine_tunes = cfg.trials * (len(cfg.methods) * len(cfg.ks) * cfg.groups + 1)
    timings["total"] = time.perf_counter() - t_start
    return dict(
        benchmark="tail-patch", config=asdict(cfg),
        world={"path": str(world.path), "size": world.meta.get("size"), "variant": cfg.world, "hash": world.meta.get("hash"),
               "documents": len(world.documents), "test_facts": len(world.test_facts)},
        results=_summary(trials, cfg), trials=trials, fine_tunes=fine_tunes,
        timings_s={k: round(v, 2) for k, v in timings.items()},
        seconds_per_fine_tune=round(timings["re-fine-tuning"] * max(1, cfg.workers) / fine_tunes, 3),
    )


def _effects(lp: dict, base: np.ndarray, group_of: np.ndarray, cfg: TailPatchConfig) -> dict:
    """Per (method, k): each query's change under its own group's patch minus the mean change under the others'."""
    out = {}
    for m in cfg.methods:
        for k in cfg.ks:
            delta = np.stack([lp[(m, k, g)] - base for g in range(cfg.groups)])  # (groups, queries)
            own = delta[group_of, np.arange(len(group_of))]
            others = (delta.sum(0) - own) / max(1, cfg.groups - 1)
            out[f"{m}@{k}"] = dict(effect=(own - others).tolist(), own=own.tolist(), others=others.tolist())
    return out


def _summary(trials: list[dict], cfg: TailPatchConfig) -> list[dict]:
    rows = []
    for k in cfg.ks:
        gold = [float(np.mean(t["effects"][f"gold@{k}"]["effect"])) for t in trials] if "gold" in cfg.methods else None
        for m in cfg.methods:
            eff = [np.asarray(t["effects"][f"{m}@{k}"]["effect"]) for t in trials]
            means = [float(e.mean()) for e in eff]
            pooled = np.concatenate(eff)
            se = float(pooled.std(ddof=1) / np.sqrt(len(pooled))) if len(pooled) > 1 else float("nan")
            row = dict(method=m, k=k, effect=summarize(means), pooled_se=se, t=float(pooled.mean()) / se if se else float("nan"),
                       own=summarize([float(np.mean(t["effects"][f"{m}@{k}"]["own"])) for t in trials]),
                       positive=summarize([float((e > 0).mean()) for e in eff]),
                       patch_size=float(np.mean([t["patch_size"][f"{m}@{k}"] for t in trials])),
                       query_std=float(np.mean([e.std() for e in eff])))
            if gold is not None:  # a ratio of trial means; meaningless when gold's own effect is not above its noise
                row["fraction_of_gold"] = summarize([a / g if g else float("nan") for a, g in zip(means, gold)])
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ outputs


def markdown(res: dict) -> str:
    cfg = res["config"]
    w = res["world"]
    lines = [f"# Multi-stage tail-patch ({w['variant']} world, {w['size']}: {w['documents']} documents, "
             f"{w['test_facts']} test facts)", "",
             f"A step of size {cfg['step']} × ‖θ_pt‖ along −∇ (mean loss of each query's top-k pre-training documents), then the world's QA "
             f"fine-tuning rerun (same data, order, seed); effect = Δ log p(answer | prompt) of the query under its "
             f"own group's patch minus under the other groups' ({cfg['groups']} groups per trial); mean ± std over "
             f"{cfg['trials']} trials of {min(cfg['n_queries'], w['test_facts'])} queries; λ = {cfg['damping']} for "
             f"MS-IF / SS-IF; {res['fine_tunes']} fine-tunes, {res['seconds_per_fine_tune']:.1f} s each.", "",
             "Cells: effect mean ± std over trials; t = pooled mean / its standard error over all queries of all "
             "trials; >0 = share of queries the patch helped.", "",
             "| method | " + " | ".join(f"effect k={k} | t | >0" for k in cfg["ks"]) + " |",
             "|---|" + "---|---|---|" * len(cfg["ks"])]
    by = {(r["method"], r["k"]): r for r in res["results"]}
    for m in cfg["methods"]:
        cells = []
        for k in cfg["ks"]:
            r = by[(m, k)]
            cells += [fmt_mean_std(r["effect"]["mean"], r["effect"]["std"], 3), f"{r['t']:.1f}", f"{r['positive']['mean']:.2f}"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for k in cfg["ks"]:
        g = by.get(("gold", k))
        if g is None:
            continue
        if abs(g["t"]) >= 2:
            lines.append(f"\nk={k}: as a fraction of the gold sources' effect: " + ", ".join(
                f"{m} {by[(m, k)]['fraction_of_gold']['mean']:.2f}" for m in cfg["methods"] if m != "gold"))
        else:
            lines.append(f"\nk={k}: the gold sources' own effect ({g['effect']['mean']:.3f}, t = {g['t']:.1f}) is not above its "
                         "noise, so no fraction of it is reported (a step on the documents that state a fact does not "
                         "reliably move its answer).")
    return "\n".join(lines) + "\n"


def plot(res: dict, path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = res["config"]["ks"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in res["config"]["methods"]:
        rows = [r for r in res["results"] if r["method"] == m]
        ax.errorbar(ks, [r["effect"]["mean"] for r in rows], yerr=[r["effect"]["std"] for r in rows], marker="o",
                    capsize=3, label=m, linestyle="--" if m in ("gold", "random") else "-")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("documents patched per query (k)")
    ax.set_ylabel("Δ log p(answer) vs other groups' patches")
    ax.set_title(f"Multi-stage tail-patch ({res['world']['variant']} world)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_outputs(res: dict, out_dir) -> dict[str, Path]:
    from .outputs import write_outputs as _write

    return _write(res, out_dir, "tail_patch", markdown, plot)
