"""FAISS indexes of normalised vectors: build and fill one (flat, IVF or HNSW), set its search settings,
and calibrate them to a target recall against exact search on held-out corpus vectors."""

from __future__ import annotations

import math
import warnings

import numpy as np

from msif.retrieval.exact import drop_self, exact_topk, recall_at_k


def _default_nlist(n: int) -> int:
    # ~2·sqrt(N) cells, and at least ~39 training points per cell (FAISS's own minimum).
    return int(max(1, min(round(2 * math.sqrt(n)), n // 39)))


def make_faiss(kind: str, vectors: np.ndarray, params: dict, seed: int, progress: bool, chunk: int = 65_536):
    """Create, train and fill a FAISS index of ``kind`` from ``vectors`` (possibly a memmap)."""
    index, info = _trained_index(kind, vectors, params, seed)
    _add_vectors(index, kind, vectors, progress, chunk)
    return index, info


def _trained_index(kind: str, vectors: np.ndarray, params: dict, seed: int):
    """An empty FAISS index of ``kind`` (IVF: its cells trained by k-means on a sample), and its parameters."""
    import faiss

    n, d = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
        info = {}
    elif kind == "ivf":
        nlist = int(params.get("nlist") or _default_nlist(n))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        train_n = min(n, int(params.get("train_size") or 64 * nlist))
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=train_n, replace=False))
        train = np.ascontiguousarray(vectors[sample], dtype=np.float32)
        index.cp.seed = seed
        index.cp.niter = int(params.get("kmeans_iters", 20))
        index.cp.max_points_per_centroid = max(train_n // nlist + 1, 1)  # no silent re-subsampling
        index.train(train)
        info = {"nlist": nlist, "train_size": train_n, "kmeans_iters": index.cp.niter}
    elif kind == "hnsw":
        m = int(params.get("M", 32))
        index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(params.get("ef_construction", 80))
        info = {"M": m, "ef_construction": index.hnsw.efConstruction}
    else:  # pragma: no cover - guarded by msif.retrieval.index._choose_type
        raise ValueError(kind)
    return index, info


def _add_vectors(index, kind: str, vectors: np.ndarray, progress: bool, chunk: int) -> None:
    """Add ``vectors`` ``chunk`` rows at a time (a memmap is never read whole)."""
    n = len(vectors)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, unit="vec", desc=f"adding to {kind} index")
    for lo in range(0, n, chunk):
        block = np.ascontiguousarray(vectors[lo : lo + chunk], dtype=np.float32)
        index.add(block)
        if bar is not None:
            bar.update(len(block))
    if bar is not None:
        bar.close()


def set_search_params(index, kind: str, search: dict) -> None:
    import faiss

    if kind == "ivf" and "nprobe" in search:
        faiss.extract_index_ivf(index).nprobe = int(search["nprobe"])
    if kind == "hnsw" and "ef_search" in search:
        index.hnsw.efSearch = int(search["ef_search"])


def calibrate_search(index, kind: str, vectors: np.ndarray, k: int, n_queries: int, target: float, seed: int) -> tuple[dict, dict]:
    """Smallest search setting whose held-out recall@k against exact search reaches ``target``."""
    n = len(vectors)
    if kind == "flat":
        return {}, {"recall": 1.0, "note": "exact search"}
    if n < 3:  # nothing to calibrate on: search everything
        return ({"nprobe": int(index.nlist)} if kind == "ivf" else {"ef_search": max(k, 16)}), {"recall": 1.0, "note": "too few vectors to calibrate"}
    k = max(1, min(k, n - 1))
    rng = np.random.default_rng(seed + 1)
    qrows = np.sort(rng.choice(n, size=min(n_queries, n), replace=False))
    q = np.ascontiguousarray(vectors[qrows], dtype=np.float32)
    _, exact = exact_topk(vectors, q, k + 1)
    exact = drop_self(exact, qrows, k)
    if kind == "ivf":
        nlist = index.nlist
        grid = sorted({v for v in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512) if v < nlist} | {nlist})
        key = "nprobe"
    else:
        grid = [v for v in (16, 32, 64, 100, 128, 192, 256, 384, 512, 768, 1024, 2048) if v >= k + 1] or [k + 1]
        key = "ef_search"
    tried = []
    chosen, rec = grid[-1], None
    for v in grid:
        set_search_params(index, kind, {key: v})
        _, approx = index.search(q, k + 1)
        r = recall_at_k(drop_self(approx, qrows, k), exact)
        tried.append([v, round(r, 4)])
        if r >= target:
            chosen, rec = v, r
            break
        rec = r
    calib = {
        "method": "held-out corpus vectors as queries (own row excluded), recall@k vs exact search",
        "queries": int(len(qrows)),
        "k": int(k),
        "target_recall": target,
        "recall": round(float(rec), 4),
        "tried": tried,
    }
    if rec < target:
        warnings.warn(f"calibration reached recall {rec:.3f} < target {target} even at {key}={chosen}", stacklevel=3)
    return {key: int(chosen)}, calib
