"""Exact nearest neighbours by inner product, and recall against them (calibration, tests, benchmarks)."""

from __future__ import annotations

import numpy as np


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int, chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner products of ``queries`` (Q, d) against ``vectors`` (N, d), streamed.

    ``vectors`` may be a memory map; it is read ``chunk`` rows at a time. Returns ``(scores, rows)``,
    both (Q, k), best first.
    """
    import faiss

    q = np.ascontiguousarray(queries, dtype=np.float32)
    n = len(vectors)
    k = min(k, n)
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for lo in range(0, n, chunk):
        block = np.ascontiguousarray(vectors[lo : lo + chunk], dtype=np.float32)
        kk = min(k, len(block))
        s, i = faiss.knn(q, block, kk, metric=faiss.METRIC_INNER_PRODUCT)
        best_s = np.concatenate([best_s, s], axis=1)
        best_i = np.concatenate([best_i, i + lo], axis=1)
        if best_s.shape[1] > k:
            top = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
            best_s = np.take_along_axis(best_s, top, 1)
            best_i = np.take_along_axis(best_i, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


def recall_at_k(approx_rows: np.ndarray, exact_rows: np.ndarray) -> float:
    """Mean over queries of |approx ∩ exact| / |exact| (rows of ``-1`` in ``approx`` never match)."""
    hits = [
        len(set(a[a >= 0].tolist()) & set(e[e >= 0].tolist())) / max(int((e >= 0).sum()), 1)
        for a, e in zip(np.asarray(approx_rows), np.asarray(exact_rows))
    ]
    return float(np.mean(hits)) if hits else 1.0


def drop_self(rows: np.ndarray, self_rows: np.ndarray, k: int) -> np.ndarray:
    """Remove each query's own row from its result list and keep ``k`` columns (pad with -1)."""
    out = np.full((len(rows), k), -1, np.int64)
    for j, (r, me) in enumerate(zip(rows, self_rows)):
        keep = r[r != me][:k]
        out[j, : len(keep)] = keep
    return out
