"""Ranking metrics for fact tracing (paper §5.3): MRR and Recall@k, with chance levels and mean ± std.

A query's candidates come with scores (larger = ranked higher) and a gold mask (the candidate is one of
the fact's source documents). Conventions, used everywhere in msif:

* **Ties** are broken deterministically and *pessimistically* by default: within a group of equal
  scores, gold candidates rank after non-gold ones, so a method cannot gain from ties (a constant
  scorer gets the worst possible rank, never a lucky one). ``ties="optimistic"`` puts gold first,
  ``ties="order"`` keeps the candidates' given order. NaN scores rank last.
* **No gold in the list** (e.g. the candidate retrieval missed every source): the query's reciprocal
  rank and recalls are 0; it still counts in the mean.
* **Recall@k "any"**: 1 if at least one gold candidate is in the top ``k``, else 0.
* **Recall@k "fraction"**: (gold candidates in the top ``k``) / ``n_gold``, where ``n_gold`` is the
  number of gold sources of the fact (default: the gold candidates in the list). Passing the fact's
  total makes the figure honest when the candidate list holds only some of the sources.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

TIES = ("pessimistic", "optimistic", "order")


def _as_arrays(scores, gold) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    g = np.asarray(gold).reshape(-1)
    if g.dtype != bool:
        # a list of gold positions
        idx = g.astype(np.int64)
        g = np.zeros(len(s), dtype=bool)
        if idx.size:
            if idx.min() < 0 or idx.max() >= len(s):
                raise ValueError("gold positions are outside the candidate list")
            g[idx] = True
    if len(g) != len(s):
        raise ValueError(f"{len(s)} scores but a gold mask of {len(g)}")
    return s, g


def ranking(scores, gold, ties: str = "pessimistic") -> np.ndarray:
    """Candidate positions, best first (scores descending; ties as described in the module docstring)."""
    s, g = _as_arrays(scores, gold)
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, not {ties!r}")
    key = np.where(np.isnan(s), -np.inf, s)
    pos = np.arange(len(s))
    if ties == "order":
        return np.lexsort((pos, -key))
    tie = g.astype(np.int64) if ties == "pessimistic" else (~g).astype(np.int64)
    # np.lexsort: the last key is the primary one
    return np.lexsort((pos, tie, -key))


def gold_ranks(scores, gold, ties: str = "pessimistic") -> np.ndarray:
    """1-based ranks of the gold candidates, ascending (empty when there is no gold candidate)."""
    s, g = _as_arrays(scores, gold)
    order = ranking(s, g, ties)
    return np.flatnonzero(g[order]) + 1


def reciprocal_rank(scores, gold, ties: str = "pessimistic") -> float:
    """1 / rank of the best-ranked gold candidate; 0 when the list holds no gold candidate."""
    r = gold_ranks(scores, gold, ties)
    return 1.0 / float(r[0]) if len(r) else 0.0


def recall_any_at_k(scores, gold, k: int, ties: str = "pessimistic") -> float:
    """1 if a gold candidate is among the top ``k``, else 0."""
    if k < 1:
        raise ValueError("k must be ≥ 1")
    r = gold_ranks(scores, gold, ties)
    return float(len(r) > 0 and r[0] <= k)


def recall_frac_at_k(scores, gold, k: int, n_gold: int | None = None, ties: str = "pessimistic") -> float:
    """(gold candidates in the top ``k``) / ``n_gold`` (default: the gold candidates in the list).

    ``n_gold`` = 0 gives 0. ``n_gold`` smaller than the gold candidates in the list is an error.
    """
    if k < 1:
        raise ValueError("k must be ≥ 1")
    s, g = _as_arrays(scores, gold)
    n_in = int(g.sum())
    n_gold = n_in if n_gold is None else int(n_gold)
    if n_gold < n_in:
        raise ValueError(f"n_gold={n_gold} but the list holds {n_in} gold candidates")
    if n_gold == 0:
        return 0.0
    r = gold_ranks(s, g, ties)
    return float((r <= k).sum()) / n_gold


def query_metrics(scores, gold, n_gold: int | None = None, ks: Sequence[int] = (10,), ties: str = "pessimistic") -> dict:
    """``{"mrr", "recall_any@k", "recall_frac@k" for k in ks}`` for one query (``mrr`` = reciprocal rank)."""
    out = {"mrr": reciprocal_rank(scores, gold, ties)}
    for k in ks:
        out[f"recall_any@{k}"] = recall_any_at_k(scores, gold, k, ties)
        out[f"recall_frac@{k}"] = recall_frac_at_k(scores, gold, k, n_gold, ties)
    return out


def mean_metrics(per_query: Iterable[dict]) -> dict:
    """Mean of each metric over queries (an empty input gives NaN for nothing: returns ``{}``)."""
    rows = list(per_query)
    if not rows:
        return {}
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


# ------------------------------------------------------------------------------------------- chance


def chance_mrr(n: int, g: int) -> float:
    """Expected reciprocal rank of the first of ``g`` gold items among ``n`` under a uniformly random order.

    ``P(first gold at rank r) = C(n-r, g-1) / C(n, g)``; 0 when ``g`` = 0.
    """
    if g < 0 or n < 0 or g > n:
        raise ValueError("need 0 ≤ g ≤ n")
    if g == 0:
        return 0.0
    total = math.comb(n, g)
    return float(sum(math.comb(n - r, g - 1) / total / r for r in range(1, n - g + 2)))


def chance_recall_any(n: int, g: int, k: int) -> float:
    """Probability that a random order puts at least one of ``g`` gold items among ``n`` in the top ``k``."""
    if g < 0 or n < 0 or g > n:
        raise ValueError("need 0 ≤ g ≤ n")
    k = min(k, n)
    if g == 0:
        return 0.0
    return 1.0 - math.comb(n - g, k) / math.comb(n, k)


def chance_recall_frac(n: int, g: int, k: int, n_gold: int | None = None) -> float:
    """Expected fraction of the fact's ``n_gold`` sources (``g`` of them in the list of ``n``) in a random top ``k``."""
    n_gold = g if n_gold is None else n_gold
    if n_gold == 0 or n == 0:
        return 0.0
    return g * min(k, n) / n / n_gold


# ------------------------------------------------------------------------------------ mean ± std


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for a single value; NaN, NaN for none)."""
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def summarize(values: Iterable[float]) -> dict:
    """``{"mean", "std", "values"}`` (sample std over trials, see :func:`mean_std`)."""
    vals = [float(x) for x in values]
    m, s = mean_std(vals)
    return {"mean": m, "std": s, "values": vals}


def fmt_mean_std(mean: float, std: float, digits: int = 3) -> str:
    """``"0.512 ± 0.023"`` (``"–"`` for NaN)."""
    if mean != mean:
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"
