"""How far fine-tuning moved the weights (paper §5.2, Figure 2): the premise of the proximity term.

Multi-stage influence treats fine-tuning as minimising the fine-tuning loss plus an implicit
``(α/2)‖θ − θ_pt‖²`` (docs/method.md §3). Whether that is plausible is measured here: for every parameter
that the pre-trained and fine-tuned models share **by name and shape**,

* ``distance = ‖θ_ft − θ_pt‖₂`` (Frobenius norm for a matrix), ``norm_pt = ‖θ_pt‖₂`` and
  ``ratio = distance / norm_pt`` (the paper reports the ratio per weight matrix stayed under 8%);
* totals over all shared parameters: ``‖Δ‖²`` (the paper's "squared distance"), ``‖Δ‖ / ‖θ_pt‖`` and
  the proximity loss ``(α/2)‖Δ‖²`` for a given ``α``; the same over weight matrices only.

Parameters present in only one model (a replaced head: ``embed_out`` of the causal LM vs ``score`` of a
classifier built from it) or whose shapes differ are listed as skipped, never silently compared.
Everything is computed in float64.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .outputs import write_outputs as _write_outputs


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def proximity(pretrained: nn.Module, finetuned: nn.Module, alpha: float = 1.0) -> dict:
    """Per-parameter distances between two models and the totals (see the module docstring).

    Returns a JSON-serialisable dict: ``parameters`` (one row per shared parameter, in the pre-trained
    model's order: ``name, shape, numel, matrix, distance, norm_pt, ratio, squared_distance``),
    ``skipped`` (``name, reason, shape_pt, shape_ft``), and the totals.
    """
    if not (alpha >= 0) or math.isinf(alpha):
        raise ValueError(f"alpha must be a finite number ≥ 0, not {alpha}")
    a, b = _params(pretrained), _params(finetuned)
    rows, skipped = [], []
    for name, x in a.items():
        y = b.get(name)
        if y is None:
            skipped.append({"name": name, "reason": "only in the pre-trained model", "shape_pt": list(x.shape), "shape_ft": None})
            continue
        if tuple(x.shape) != tuple(y.shape):
            skipped.append({"name": name, "reason": "shapes differ", "shape_pt": list(x.shape), "shape_ft": list(y.shape)})
            continue
        x64, y64 = x.to(torch.float64).cpu(), y.to(torch.float64).cpu()
        sq = float(((y64 - x64) ** 2).sum())
        norm = float(torch.linalg.vector_norm(x64))
        dist = math.sqrt(sq)
        rows.append({
            "name": name,
            "shape": list(x.shape),
            "numel": int(x.numel()),
            "matrix": x.dim() >= 2,
            "distance": dist,
            "norm_pt": norm,
            "ratio": dist / norm if norm > 0 else (0.0 if dist == 0 else None),  # None: moved away from zero
            "squared_distance": sq,
        })
    for name, y in b.items():
        if name not in a:
            skipped.append({"name": name, "reason": "only in the fine-tuned model", "shape_pt": None, "shape_ft": list(y.shape)})
    if not rows:
        raise ValueError("the two models share no parameter by name and shape: are they the same architecture?")

    def totals(sel):
        sq = sum(r["squared_distance"] for r in sel)
        norm_sq = sum(r["norm_pt"] ** 2 for r in sel)
        return {
            "parameters": len(sel),
            "numel": sum(r["numel"] for r in sel),
            "squared_distance": sq,
            "distance": math.sqrt(sq),
            "relative_distance": math.sqrt(sq / norm_sq) if norm_sq > 0 else None,
            "proximity_loss": 0.5 * alpha * sq,
        }

    mats = [r for r in rows if r["matrix"]]
    rated = [r for r in mats if r["ratio"] is not None]
    ratios = np.array([r["ratio"] for r in rated], dtype=np.float64)
    return {
        "alpha": float(alpha),
        "parameters": rows,
        "skipped": skipped,
        "total": totals(rows),
        "matrices": totals(mats),
        "ratio_stats": ({"n": int(len(ratios)), "min": float(ratios.min()), "median": float(np.median(ratios)),
                         "mean": float(ratios.mean()), "max": float(ratios.max()),
                         "max_name": rated[int(ratios.argmax())]["name"]} if len(ratios) else None),
    }


def proximity_from_paths(pretrained: str, finetuned: str, alpha: float = 1.0) -> dict:
    """:func:`proximity` of two local checkpoints loaded with ``load_model(path, task="auto")``."""
    from ..models.loading import load_model

    res = proximity(load_model(pretrained, task="auto"), load_model(finetuned, task="auto"), alpha=alpha)
    res["pretrained"], res["finetuned"] = str(pretrained), str(finetuned)
    return res


def histogram(res: dict, path: str | Path, bins: int = 30) -> Path:
    """Histogram of the per-matrix ratios ``‖θ_ft − θ_pt‖ / ‖θ_pt‖`` (the paper's Figure 2), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = [r["ratio"] for r in res["parameters"] if r["matrix"] and r["ratio"] is not None]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(np.array(ratios) * 100, bins=bins, color="C0", edgecolor="white")
    ax.set_xlabel("‖θ_ft − θ_pt‖₂ / ‖θ_pt‖₂ per weight matrix (%)")
    ax.set_ylabel("weight matrices")
    t = res["total"]
    ax.set_title(f"{len(ratios)} matrices; total ‖Δ‖² = {t['squared_distance']:.4g}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(res: dict, top: int | None = None) -> str:
    """A markdown report: totals, then one row per shared parameter (largest ratio first), then the skipped ones."""
    t, m = res["total"], res["matrices"]
    lines = ["# Weight proximity of the fine-tuned model to the pre-trained one", ""]
    if "pretrained" in res:
        lines += [f"pre-trained: `{res['pretrained']}`, fine-tuned: `{res['finetuned']}`", ""]
    lines.append(f"- shared parameters: {t['parameters']} ({t['numel']} values); weight matrices: {m['parameters']}")
    lines.append(f"- total squared distance ‖Δ‖²: {t['squared_distance']:.6g} (matrices only: {m['squared_distance']:.6g})")
    rel = t["relative_distance"]
    lines.append(f"- ‖Δ‖ / ‖θ_pt‖ over all shared parameters: {rel:.4%}" if rel is not None else "- ‖θ_pt‖ = 0")
    lines.append(f"- proximity loss (α/2)‖Δ‖² at α = {res['alpha']:g}: {t['proximity_loss']:.6g}")
    rs = res["ratio_stats"]
    if rs:
        lines.append(f"- per-matrix ratio ‖Δ_W‖/‖W_pt‖: median {rs['median']:.4%}, max {rs['max']:.4%} ({rs['max_name']})")
    lines += ["", "| parameter | shape | ‖Δ‖ | ‖θ_pt‖ | ratio |", "|---|---|---|---|---|"]
    rows = sorted(res["parameters"], key=lambda r: -(math.inf if r["ratio"] is None else r["ratio"]))
    for r in rows[:top] if top else rows:
        ratio = "– (‖θ_pt‖ = 0)" if r["ratio"] is None else f"{r['ratio']:.4%}"
        lines.append(f"| {r['name']} | {'×'.join(map(str, r['shape']))} | {r['distance']:.4g} | {r['norm_pt']:.4g} | {ratio} |")
    if res["skipped"]:
        lines += ["", "Skipped (not shared by name and shape):", ""]
        for s in res["skipped"]:
            lines.append(f"- {s['name']}: {s['reason']} (pre-trained {s['shape_pt']}, fine-tuned {s['shape_ft']})")
    return "\n".join(lines) + "\n"


def write_outputs(res: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``proximity.json``, ``proximity.md`` and ``proximity.png`` into ``out_dir``."""
    return _write_outputs(res, out_dir, "proximity", markdown, histogram)
