"""Rendering of the scalability study's results (:func:`msif.eval.scalability.run`): the paper's Table 1
layout as markdown, the Figure 1 style plot of Spearman against time, the training curve, the
checkpoint sweep, and the files of a run (:func:`write_outputs`). Reads only the results dict.
"""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

from ..atomic import atomic_write, atomic_write_text
from .lds import markdown_table as lds_table
from .scalability import PAPER_TABLE1, PAPER_TIMES

_LABEL = {"cg": "CG (ground truth)", "gdp": "GDP", "cka": "CKA", "trak": "TRAK", "ekfac": "EK-FAC",
          "ekfac_mlp": "EK-FAC (MLP)", "ekfac_attention": "EK-FAC (attention)", "kfac": "K-FAC",
          "diagonal": "diagonal", "exact_dense": "exact dense solve", "exact_block": "exact block-diagonal GGN (ceiling)",
          "exact_module": "exact module-diagonal GGN", "exact_block_mlp": "exact block-diagonal, MLP only",
          "trak_single_model": "TRAK (analysed model only)",
          "ekfac_exact_lambda": "EK-FAC, exact Λ (diagnostic)",
          "ekfac_refined": "EK-FAC, refined basis (`--refine-basis`)",
          "kron_best": "best single-Kronecker basis per block, exact Λ (diagnostic ceiling of EK-FAC)"}


def _fmt_t(s) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "–"
    if s >= 3600:
        return f"{s / 3600:.3g} h"
    return f"{s:.3g} s"


def _paper_key(name: str) -> str | None:
    if name in PAPER_TABLE1:
        return name
    for p in ("lissa", "arnoldi"):
        if name.startswith(p + "_"):
            return p
    return None


def markdown_table(res: dict) -> str:
    """The paper's Table 1 layout, one section per damping, with the paper's numbers alongside."""
    lines = []
    m = res["model"]
    lines.append(
        f"Model: GPT-NeoX {m['layers']} layers, {m['heads']} heads, hidden {m['hidden']}, D = {m['D']} analysed weights "
        f"({m['mlp_weights']} MLP, {m['attention_weights']} attention); {res['data']['n_train']} training sentences, "
        f"vocab {m['vocab']}; {len(res['data']['queries'])} queries × {res['data']['n_candidates']} candidates; "
        f"G over {res['data']['n_curvature']} sentences. Training loss {res['training']['train_loss'][0]:.3f} → "
        f"{res['training']['train_loss'][-1]:.3f} (converged: {res['training'].get('converged')})."
    )
    for key, d in res["dampings"].items():
        gt = d["ground_truth"]
        lines.append("")
        lines.append(f"### damping λ = {key} mean eigenvalue = {d['lambda']:.3g}")
        lines.append(
            f"Ground truth: CG to relative residual {gt['tol']:.0e} (converged: {gt['converged']}, {gt['iterations']} iterations, "
            f"relative error vs dense solve {gt['rel_error_vs_dense']:.1e}, score cosine {gt['score_cosine_vs_dense']:.6f})."
        )
        lines.append("")
        lines.append("| method | Spearman ρ (mean ± std) | Pearson r | overhead | pair-wise / query | matrix-free time / query | paper ρ | paper overhead / pair-wise |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for name, r in d["methods"].items():
            pk = _paper_key(name)
            paper = PAPER_TABLE1.get(pk) if pk else None
            ptimes = PAPER_TIMES.get(pk) if pk else None
            label = _LABEL.get(name, name.replace("_", " "))
            if name.startswith("lissa_"):
                label = f"LiSSA (depth {name.split('_')[1]})"
            elif name.startswith("cg_"):
                label = f"CG ({name.split('_')[1]} iterations)"
            elif name.startswith("arnoldi_"):
                label = f"Arnoldi (top {name.split('_')[1]})"
            elif name.startswith(("ekfac_pcg_", "ekfac_refined_pcg_")):
                k = name.rsplit("_", 1)[1]
                label = (f"EK-FAC{', refined basis,' if 'refined' in name else ''} + {k} refinement step{'' if k == '1' else 's'} "
                         f"(`{'--refine-basis 1 ' if 'refined' in name else ''}--refine-query {k}`: {int(k) + 1} GGN-vector products / query)")
            elif name.startswith("block_pcg_"):
                k = name.split("_")[2]
                label = f"exact block-diagonal GGN + {k} refinement step{'' if k == '1' else 's'} (diagnostic preconditioner)"
            elif name.startswith("ekfac_R"):
                label = f"EK-FAC, {name[7:]} label draws per sentence (diagnostic)"
            mf = r.get("matrix_free_s")
            if name.startswith("arnoldi_"):
                mf = r.get("overhead_matrix_free_s")
                mf_s = f"{_fmt_t(mf)} (overhead)"
            else:
                mf_s = _fmt_t(mf) if mf is not None else "–"
            show_pt = bool(ptimes) and (name == pk or name.startswith(("lissa_", "arnoldi_")))
            paper_s = "ground truth" if pk == "cg" and name == "cg" else (f"{paper:.3f}" if paper is not None else "–")
            lines.append(
                f"| {label} | {r['spearman_mean']:.3f} ± {r['spearman_std']:.3f} | {r['pearson_mean']:.3f} ± {r['pearson_std']:.3f} | "
                f"{_fmt_t(r['overhead_s'])} | {_fmt_t(r['pairwise_s'])} | {mf_s} | {paper_s} | "
                f"{ptimes[0] + ' / ' + ptimes[1] if show_pt else '–'} |"
            )
        sh = d["methods"]["ekfac"].get("influence_share", {})
        if sh:
            lines.append("")
            lines.append(
                f"Share of total |influence| (EK-FAC, all blocks): attention {sh['attention']:.1%}, MLP {sh['mlp']:.1%} "
                f"(exact block-diagonal: attention {d['influence_share_exact_block']['attention']:.1%}); attention holds "
                f"{m['attention_weight_share']:.1%} of the analysed weights. Paper: 14.5% of the influence with 25% of the weights."
            )
    lines += _kronecker_lines(res)
    return "\n".join(lines)


def _kronecker_lines(res: dict) -> list[str]:
    lines = []
    kr = res.get("kronecker", {}).get("offdiagonal_mass")
    if kr:
        lines += ["", "### Why block-diagonal is not EK-FAC: the Kronecker eigenbasis",
                  "Share of each exact GGN block's squared Frobenius norm that lies off the diagonal in the basis a "
                  "method uses (mean over blocks; 0 = the basis diagonalises the block, which EK-FAC would need to "
                  "reach the ceiling with its exact-diagonal Λ): "
                  f"token-covariance eigenbasis (EK-FAC) {kr['ekfac']:.3f}, refined basis {kr['ekfac_refined']:.3f}, "
                  f"best single-Kronecker basis {kr['best']:.3f}."]
    sw = res.get("sweep") or []
    if sw:
        keys = sorted({k for r in sw for k in r["spearman"]}, key=lambda k: float(k[:-1]))
        lines += ["", "### The same run's earlier checkpoints: EK-FAC against the ceiling as training proceeds",
                  "Spearman against CG on the exact GGN at each checkpoint (its own curvature, damping as a multiple of "
                  "its own mean eigenvalue).", "",
                  "| epoch | train loss | held-out loss | damping | ceiling (exact block-diag.) | best Kronecker basis, exact Λ | "
                  "EK-FAC refined | EK-FAC | GDP | off-diag. share: EK-FAC / refined / best |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sw:
            od = r["offdiagonal_mass"]
            for k in keys:
                if k not in r["spearman"]:
                    continue
                v = r["spearman"][k]
                lines.append(
                    f"| {r['epoch']} | {r['train_loss']:.3f} | {r['heldout_loss']:.3f} | {k} | {v['exact_block']:.3f} | "
                    f"{v['kron_best']:.3f} | {v['ekfac_refined']:.3f} | {v['ekfac']:.3f} | {v['gdp']:.3f} | "
                    f"{od['ekfac']:.2f} / {od['ekfac_refined']:.2f} / {od['best']:.2f} |"
                )
    return lines


def _pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_png: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def plot(res: dict, out_png: str, damping: str | None = None) -> str:
    """Spearman against time per method (Figure 1 style), log time axis; writes ``out_png``."""
    plt = _pyplot()

    key = damping or list(res["dampings"])[len(res["dampings"]) // 2]
    d = res["dampings"][key]
    Q = len(res["data"]["queries"])
    fig, ax = plt.subplots(figsize=(11, 4.8))
    groups: dict[str, list] = collections.defaultdict(list)
    for name, r in d["methods"].items():
        if name in ("cg", "exact_block_mlp"):
            continue
        if name.startswith("arnoldi_"):
            tt = r.get("overhead_matrix_free_s", r["overhead_s"]) + Q * r["pairwise_s"]
        else:
            tt = r["overhead_s"] + Q * r.get("matrix_free_s", r["pairwise_s"])
        g = name.split("_")[0] if name.startswith(("lissa_", "cg_", "arnoldi_")) else name
        groups[g].append((max(tt, 1e-4), r["spearman_mean"], name))
    colors = plt.get_cmap("tab20").colors
    markers = "os^Dv<>pP*Xh"
    for i, (g, pts) in enumerate(groups.items()):
        pts.sort()
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        label = {"lissa": "LiSSA", "cg": "CG (budgets)", "arnoldi": "Arnoldi"}.get(g, _LABEL.get(g, g))
        if g.startswith("ekfac_R"):
            label = f"EK-FAC, {g[7:]} label draws"
        ax.plot(xs, ys, marker=markers[i % len(markers)], color=colors[i % len(colors)],
                linestyle="-" if len(pts) > 1 else "none", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("total time for all queries (s; iterative methods: matrix-free estimate)")
    ax.set_ylabel("Spearman ρ vs CG ground truth")
    ax.set_title(f"Influence quality vs time (damping {key} mean eigenvalue)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return _save(fig, out_png)


def plot_training(res: dict, out_png: str) -> str:
    plt = _pyplot()

    c = res["training"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(c["epoch"], c["train_loss"], marker=".", label="training set")
    if any(x is not None for x in c["heldout_loss"]):
        ax.plot(c["epoch"], c["heldout_loss"], marker=".", label="held-out sentences")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean token cross-entropy (nats)")
    ax.set_title("Training curve of the scalability model")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out_png)


def plot_checkpoints(res: dict, out_png: str) -> str:
    """Spearman of the ceiling, the best Kronecker basis, refined EK-FAC, EK-FAC and GDP at each checkpoint."""
    plt = _pyplot()

    sw = res.get("sweep") or []
    keys = sorted({k for r in sw for k in r["spearman"]}, key=lambda k: float(k[:-1]))
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(5.5 * max(1, len(keys)), 4), squeeze=False)
    names = {"exact_block": "exact block-diagonal (ceiling)", "kron_best": "best Kronecker basis, exact Λ",
             "ekfac_refined": "EK-FAC, refined basis", "ekfac": "EK-FAC", "gdp": "GDP"}
    for ax, k in zip(axes[0], keys):
        rows = [r for r in sw if k in r["spearman"]]
        for n, label in names.items():
            ax.plot([r["epoch"] for r in rows], [r["spearman"][k][n] for r in rows], marker="o", label=label)
        ax.set_xscale("log")
        ep = [r["epoch"] for r in rows]
        ax.set_xticks(ep, [str(e) for e in ep])
        ax.minorticks_off()
        ax.set_xlabel("epoch (checkpoint of the same run)")
        ax.set_ylabel("Spearman ρ vs CG ground truth")
        ax.set_title(f"damping {k} mean eigenvalue")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, out_png)


def write_outputs(res: dict, out_dir) -> dict[str, str]:
    """Write ``results.json``, ``table.md``, ``spearman_vs_time.png``, ``training_curve.png`` and (with a
    checkpoint sweep) ``checkpoints.png`` into ``out_dir``, each file atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "results.json", "table": out / "table.md",
        "figure": out / "spearman_vs_time.png", "training_curve": out / "training_curve.png",
    }
    atomic_write_text(paths["json"], json.dumps(res, indent=1, default=float))
    atomic_write_text(paths["table"], markdown_table(res) + "\n")
    atomic_write(paths["figure"], lambda p: plot(res, str(p)))
    atomic_write(paths["training_curve"], lambda p: plot_training(res, str(p)))
    if res.get("sweep"):
        paths["checkpoints"] = out / "checkpoints.png"
        atomic_write(paths["checkpoints"], lambda p: plot_checkpoints(res, str(p)))
    if "lds" in res:
        paths["lds_table"] = out / "lds.md"
        atomic_write_text(paths["lds_table"], lds_table(res["lds"]) + "\n")
    return {k: str(v) for k, v in paths.items()}
