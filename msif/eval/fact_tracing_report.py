"""The fact-tracing results as markdown tables and a Figure-3-style plot (:mod:`msif.eval.fact_tracing`
computes them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..curvature.damping import Damping
from .metrics import fmt_mean_std
from .outputs import write_outputs as _write_outputs

SETTINGS = ("knn", "pool")

_TASK_NAMES = {"qa": "QA fine-tune", "cls": "classification fine-tune"}
_SETTING_NAMES = {"knn": "candidates = embedding nearest neighbours", "pool": "candidates = fixed rerank pool"}


def _fmt_damping(lam) -> str:
    if lam is None:
        return "–"
    return lam if isinstance(lam, str) else f"{lam:.0e}"


def markdown(res: dict) -> str:
    """The results as markdown tables (one per task and candidate setting) with the notes that read them."""
    return "\n".join(_header_lines(res) + _setting_lines(res) + _closing_lines(res)) + "\n"


def _header_lines(res: dict) -> list[str]:
    """The world, the trials, the dampings and how to read the metrics."""
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
    return lines


def _setting_lines(res: dict) -> list[str]:
    """One table per (task, candidate setting): every method and damping, and the chance row."""
    cfg = res["config"]
    k = cfg["k"]
    lines = []
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
    return lines


def _closing_lines(res: dict) -> list[str]:
    """The best damping of each damped method, the verdict, the timings and the refinement's cost."""
    lines = ["## Best damping per method (by mean MRR)"]
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
    return lines


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
    lams = np.array([Damping.parse(x).value for x in res["dampings"]])
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
                    x = np.array([Damping.parse(r["damping"]).value for r in rr])
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
