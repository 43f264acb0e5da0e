"""Embedding index over a corpus: stream → embed → FAISS on disk → nearest-neighbour candidates.

:func:`build_index` streams a corpus (:class:`msif.data.corpus.Corpus`) in batches, embeds each batch
(:mod:`msif.retrieval.embed`) into a memory-mapped ``.npy`` file, then builds a FAISS index from it.
Similarity is the inner product of L2-normalised vectors, i.e. cosine.

Index types (``index_type``):

* ``"flat"`` — exact search (``IndexFlatIP``).
* ``"ivf"`` — ``IndexIVFFlat`` with ``nlist ≈ 2·sqrt(N)`` cells trained by k-means on a sample; the
  number of probed cells ``nprobe`` is **calibrated at build time**: 256 corpus vectors are held
  out as queries and ``nprobe`` is the smallest value whose recall@100 against exact search (the
  query's own row excluded) reaches ``target_recall`` (default 0.97, margin over the 0.95 promise).
* ``"hnsw"`` — ``IndexHNSWFlat`` (M=32); ``efSearch`` calibrated the same way.
* ``"auto"`` (default) — ``flat`` below 50 000 documents, ``ivf`` above.

On disk (``out_dir``)::

    meta.json         model name/dim, n_docs, corpus path + fingerprint, index type, params,
                      search settings, calibration result, size + sha256 of every file
    index.faiss       the FAISS index
    doc_ids.parquet   one string column "doc_id": row i of the corpus has doc id doc_ids[i]

The folder is written under a temporary name next to ``out_dir`` and renamed when complete. An
interrupted build leaves ``.<name>.partial`` with the embeddings written so far; rerunning the same
build resumes from there. :func:`load_index` checks sizes and checksums, the FAISS header, the counts,
and (given the corpus) that the corpus is the one the index was built for.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from msif.data.corpus import Corpus, corpus_matches, open_corpus
from msif.data.encoding import InputError
from msif.distributed import barrier, broadcast_object, gather_objects, world
from msif.retrieval.common import (
    Hits,
    StoredIndexError,
    as_query_list,
    check_files,
    commit_dir,
    file_digest,
    ids_for_rows,
    prepare_out_dir,
    read_meta,
    write_json_atomic,
)

__all__ = [
    "VectorIndex",
    "build_index",
    "build_index_from_vectors",
    "load_index",
    "exact_topk",
    "recall_at_k",
    "AUTO_FLAT_MAX_DOCS",
    "StoredIndexError",
]

FORMAT = "msif-vector-index"
VERSION = 1
AUTO_FLAT_MAX_DOCS = 50_000
INDEX_FILE = "index.faiss"
IDS_FILE = "doc_ids.parquet"
_EMB_FILE = "embeddings.npy"
_PROGRESS_FILE = "progress.json"
#: rows embedded (per rank) between two progress checkpoints of a build
CHECKPOINT_ROWS = 1024
_METRIC = "inner_product on L2-normalised vectors (cosine)"


# --------------------------------------------------------------------------------------------------
# exact search and recall (used for calibration, tests and benchmarks)


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


def _drop_self(rows: np.ndarray, self_rows: np.ndarray, k: int) -> np.ndarray:
    """Remove each query's own row from its result list and keep ``k`` columns (pad with -1)."""
    out = np.full((len(rows), k), -1, np.int64)
    for j, (r, me) in enumerate(zip(rows, self_rows)):
        keep = r[r != me][:k]
        out[j, : len(keep)] = keep
    return out


# --------------------------------------------------------------------------------------------------
# FAISS construction


def _choose_type(index_type: str, n: int) -> str:
    t = (index_type or "auto").lower()
    if t == "auto":
        return "flat" if n < AUTO_FLAT_MAX_DOCS else "ivf"
    if t not in ("flat", "ivf", "hnsw"):
        raise InputError(f"Unknown index_type {index_type!r}; use 'auto', 'flat', 'ivf' or 'hnsw'.")
    return t


def _default_nlist(n: int) -> int:
    # ~2·sqrt(N) cells, and at least ~39 training points per cell (FAISS's own minimum).
    return int(max(1, min(round(2 * math.sqrt(n)), n // 39)))


def _make_faiss(kind: str, vectors: np.ndarray, params: dict, seed: int, progress: bool, chunk: int = 65_536):
    """Create, train and fill a FAISS index of ``kind`` from ``vectors`` (possibly a memmap)."""
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
    else:  # pragma: no cover - guarded by _choose_type
        raise ValueError(kind)
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
    return index, info


def _set_search_params(index, kind: str, search: dict) -> None:
    import faiss

    if kind == "ivf" and "nprobe" in search:
        faiss.extract_index_ivf(index).nprobe = int(search["nprobe"])
    if kind == "hnsw" and "ef_search" in search:
        index.hnsw.efSearch = int(search["ef_search"])


def _calibrate(index, kind: str, vectors: np.ndarray, k: int, n_queries: int, target: float, seed: int) -> tuple[dict, dict]:
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
    exact = _drop_self(exact, qrows, k)
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
        _set_search_params(index, kind, {key: v})
        _, approx = index.search(q, k + 1)
        r = recall_at_k(_drop_self(approx, qrows, k), exact)
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


# --------------------------------------------------------------------------------------------------
# the loaded index


class VectorIndex:
    """A FAISS index over a corpus's embeddings, with its doc ids and metadata.

    Get one from :func:`build_index`, :func:`build_index_from_vectors` or :func:`load_index`.
    ``search(texts, k)`` embeds the queries with the index's model (loaded on first use);
    ``search_vectors(vectors, k)`` takes embeddings directly.
    """

    def __init__(self, folder: Path, meta: dict, faiss_index, doc_ids, encoder=None):
        self.folder = Path(folder)
        self.meta = meta
        self.faiss_index = faiss_index
        self.doc_ids = doc_ids  # pyarrow StringArray, row -> doc id
        self._encoder = encoder
        self.kind = meta["index"]["type"]
        self.search_params = dict(meta["index"].get("search", {}))
        _set_search_params(faiss_index, self.kind, self.search_params)

    def __len__(self) -> int:
        return int(self.meta["n_docs"])

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.meta["model"]["dim"])

    @property
    def model_name(self) -> str | None:
        """Name of the embedding model the index was built with."""
        return self.meta["model"].get("name")

    @property
    def encoder(self):
        """The query encoder (loaded lazily from ``meta['model']['name']``)."""
        if self._encoder is None:
            from msif.retrieval.embed import load_encoder

            if not self.model_name:
                raise InputError("This index was built from raw vectors without a model name; use search_vectors().")
            self._encoder = load_encoder(self.model_name)
            _check_encoder(self._encoder, self.meta, self.folder)
        return self._encoder

    def set_search_params(self, **params) -> None:
        """Override search settings: ``nprobe=`` (IVF) or ``ef_search=`` (HNSW)."""
        allowed = {"ivf": {"nprobe"}, "hnsw": {"ef_search"}}.get(self.kind, set())
        bad = set(params) - allowed
        if bad:
            raise InputError(f"{sorted(bad)} do not apply to a {self.kind} index (allowed: {sorted(allowed)}).")
        self.search_params.update(params)
        _set_search_params(self.faiss_index, self.kind, self.search_params)

    def search(self, query_texts: str | Sequence[str], k: int = 100, batch_size: int = 64) -> Hits:
        """Top-``k`` documents by cosine similarity for each query text → :class:`Hits`."""
        queries = as_query_list(query_texts)
        q = self.encoder.encode(queries, batch_size=batch_size)
        return self.search_vectors(q, k)

    def search_vectors(self, vectors: np.ndarray, k: int = 100) -> Hits:
        """Top-``k`` for query embeddings ``(Q, dim)`` (normalised here) → :class:`Hits`."""
        from msif.retrieval.embed import l2_normalize

        q = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if q.shape[1] != self.dim:
            raise InputError(f"query vectors have dimension {q.shape[1]}, the index has {self.dim}.")
        q = np.ascontiguousarray(l2_normalize(q))
        k = int(min(max(k, 1), len(self)))
        scores, rows = self.faiss_index.search(q, k)
        rows = rows.astype(np.int64)
        scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
        return Hits(ids_for_rows(self.doc_ids, rows), scores, rows)

    def check_corpus(self, corpus) -> None:
        """Raise :class:`StoredIndexError` unless ``corpus`` is the one this index was built for."""
        stored = self.meta.get("corpus")
        if not stored:
            return
        c = open_corpus(corpus, text_field=stored.get("text_field") or "text", id_field=stored.get("id_field"), split=stored.get("split"))
        why = corpus_matches(stored, c)
        if why is not None:
            same = stored.get("path") and Path(stored["path"]).resolve() == Path(c.path).resolve()
            built = (f"corpus {str(c.path)!r} changed after index {str(self.folder)!r} was built" if same else
                     f"Index {str(self.folder)!r} was built for corpus {stored.get('path')!r} ({stored.get('n_rows')} rows), "
                     f"not for {str(c.path)!r}")
            raise StoredIndexError(f"{built}: {why}. Rebuild the index for this corpus (`msif index CORPUS --out DIR --overwrite`).")

    def __repr__(self) -> str:
        return f"VectorIndex({str(self.folder)!r}, type={self.kind!r}, n_docs={len(self)}, dim={self.dim}, search={self.search_params})"


def _check_encoder(encoder, meta: dict, folder) -> None:
    dim = int(meta["model"]["dim"])
    if int(encoder.dim) != dim:
        raise StoredIndexError(
            f"Index {str(folder)!r} holds {dim}-dimensional embeddings from {meta['model'].get('name')!r}; the "
            f"query model {getattr(encoder, 'name', encoder)!r} gives {encoder.dim}. Use the index's model."
        )
    if meta["model"].get("name") and getattr(encoder, "name", None) != meta["model"]["name"]:
        warnings.warn(
            f"Index {str(folder)!r} was built with {meta['model']['name']!r}; querying with {encoder.name!r}. "
            "Scores are only meaningful if both embed alike.",
            stacklevel=3,
        )


# --------------------------------------------------------------------------------------------------
# building


def _write_ids(path: Path, batches) -> int:
    """Write doc ids from an iterable of lists of strings to a one-column Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("doc_id", pa.string())])
    n = 0
    with pq.ParquetWriter(path, schema) as w:
        for ids in batches:
            w.write_table(pa.table({"doc_id": pa.array(ids, pa.string())}, schema=schema))
            n += len(ids)
    return n


def _finish(
    tmp: Path,
    out_dir: Path,
    vectors: np.ndarray,
    *,
    index_type: str,
    index_params: dict | None,
    model_meta: dict,
    corpus_meta: dict | None,
    target_recall: float,
    calibration_k: int,
    calibration_queries: int,
    seed: int,
    progress: bool,
    keep_embeddings: bool,
    encoder=None,
) -> VectorIndex:
    """Build FAISS from ``vectors`` into ``tmp`` (which holds doc_ids.parquet), write meta, commit."""
    import faiss

    n, d = vectors.shape
    kind = _choose_type(index_type, n)
    index, info = _make_faiss(kind, vectors, dict(index_params or {}), seed, progress)
    search, calib = _calibrate(index, kind, vectors, calibration_k, calibration_queries, target_recall, seed)
    _set_search_params(index, kind, search)
    faiss.write_index(index, str(tmp / INDEX_FILE))
    files = {INDEX_FILE: file_digest(tmp / INDEX_FILE), IDS_FILE: file_digest(tmp / IDS_FILE)}
    if keep_embeddings and (tmp / _EMB_FILE).exists():
        files[_EMB_FILE] = file_digest(tmp / _EMB_FILE)
    else:
        (tmp / _EMB_FILE).unlink(missing_ok=True)
    (tmp / _PROGRESS_FILE).unlink(missing_ok=True)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model_meta,
        "n_docs": int(n),
        "corpus": corpus_meta,
        "index": {
            "type": kind,
            "requested": index_type,
            "metric": _METRIC,
            "params": info,
            "search": search,
            "calibration": calib,
            "faiss_version": faiss.__version__,
        },
        "files": files,
    }
    write_json_atomic(tmp / "meta.json", meta)
    commit_dir(tmp, out_dir)
    import pyarrow.parquet as pq

    ids = pq.read_table(out_dir / IDS_FILE).column("doc_id").combine_chunks()
    return VectorIndex(out_dir, meta, index, ids, encoder=encoder)


def _tmp_dir(out_dir: Path) -> Path:
    return out_dir.with_name(f".{out_dir.name}.partial")


def build_index_from_vectors(
    vectors: np.ndarray,
    out_dir: str | os.PathLike,
    doc_ids: Sequence[str] | None = None,
    *,
    index_type: str = "auto",
    index_params: dict | None = None,
    model_name: str | None = None,
    corpus: Corpus | str | os.PathLike | None = None,
    target_recall: float = 0.97,
    calibration_k: int = 100,
    calibration_queries: int = 256,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> VectorIndex:
    """Persist an index over precomputed embeddings ``vectors`` (N, d) (normalised here).

    ``doc_ids`` default to row numbers. ``corpus``, if given, is fingerprinted into the metadata so
    that :func:`load_index` can check it later. ``index_params``: ``nlist``, ``train_size``,
    ``kmeans_iters`` (IVF) or ``M``, ``ef_construction`` (HNSW). Search settings are calibrated to
    ``target_recall`` at ``calibration_k`` (see the module docstring).
    """
    from msif.retrieval.embed import l2_normalize

    out_dir = Path(out_dir)
    prepare_out_dir(out_dir, overwrite, "Index")
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise InputError(f"vectors must be a non-empty (N, d) array; got shape {vectors.shape}.")
    n, d = vectors.shape
    ids = [str(i) for i in range(n)] if doc_ids is None else [str(x) for x in doc_ids]
    if len(ids) != n:
        raise InputError(f"{len(ids)} doc ids for {n} vectors.")
    if len(set(ids)) != n:
        raise InputError("doc ids are not unique.")
    corpus_meta = None
    if corpus is not None:
        c = open_corpus(corpus)
        corpus_meta = c.fingerprint()
        corpus_meta["content_sha256"] = c.content_sha256()
        if corpus_meta["n_rows"] != n:
            raise InputError(f"corpus {str(c.path)!r} has {corpus_meta['n_rows']} rows but {n} vectors were given.")
    tmp = _tmp_dir(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_ids(tmp / IDS_FILE, [ids[i : i + 100_000] for i in range(0, n, 100_000)])
    emb = np.lib.format.open_memmap(tmp / _EMB_FILE, mode="w+", dtype=np.float32, shape=(n, d))
    for lo in range(0, n, 65_536):
        emb[lo : lo + 65_536] = l2_normalize(vectors[lo : lo + 65_536])
    emb.flush()
    model_meta = {"name": model_name, "dim": int(d), "normalized": True}
    return _finish(
        tmp, out_dir, emb,
        index_type=index_type, index_params=index_params, model_meta=model_meta, corpus_meta=corpus_meta,
        target_recall=target_recall, calibration_k=calibration_k, calibration_queries=calibration_queries,
        seed=seed, progress=progress, keep_embeddings=False,
    )  # fmt: skip


def build_index(corpus_path, out_dir, *args, **kwargs) -> "VectorIndex":
    """:func:`_build_index` (the arguments and what it does) with the output folder held by one build at
    a time: a second ``msif index`` into the same folder gets one line instead of a crash or a
    silently half-indexed folder (rank 0 holds the lock; every rank learns whether it got it)."""
    from msif.atomic import OutputLock

    w = world()
    lock, err = None, None
    if w.main:
        try:
            lock = OutputLock(out_dir, "msif index").__enter__()
        except InputError as e:
            err = e
    err = broadcast_object(err, "locking the index folder")
    if err is not None:
        raise err
    try:
        return _build_index(corpus_path, out_dir, *args, **kwargs)
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


def _build_index(
    corpus_path: str | os.PathLike | Corpus,
    out_dir: str | os.PathLike,
    model=None,
    index_type: str = "auto",
    batch_size: int = 128,
    text_field: str = "text",
    id_field: str | None = "id",
    progress: bool = True,
    *,
    split: str | None = None,
    device: str | None = None,
    index_params: dict | None = None,
    target_recall: float = 0.97,
    calibration_k: int = 100,
    seed: int = 0,
    overwrite: bool = False,
    keep_embeddings: bool = False,
    resume: bool = True,
) -> VectorIndex:
    """Embed a corpus in streamed batches and persist a FAISS index for it in ``out_dir``.

    Args:
        corpus_path: a corpus file/folder (see :mod:`msif.data.corpus`) or an open ``Corpus``.
        out_dir: output folder (created; an existing index there needs ``overwrite=True``).
        model: embedding model — ``None`` (bundled all-MiniLM-L6-v2), a local folder, a hub id, or
            an encoder object with ``name``, ``dim`` and ``encode(texts, batch_size=, progress=)``.
        index_type: ``"auto"`` (exact below 50k docs, IVF above), ``"flat"``, ``"ivf"``, ``"hnsw"``.
        batch_size: texts read and embedded per step.
        text_field, id_field, split: which fields / split of the corpus to use.
        progress: show progress bars.
        device: device for the embedding model.
        index_params: see :func:`build_index_from_vectors`.
        target_recall, calibration_k: the recall@k the approximate search settings are tuned to.
        keep_embeddings: keep ``embeddings.npy`` (N×d float32) in the index folder.
        resume: continue an interrupted build of the same corpus and model from ``.<name>.partial``.

    Duplicate doc ids are rejected before any embedding work. Returns the loaded
    :class:`VectorIndex`. Under torchrun the ranks embed blocks of rows in turn and rank 0 writes
    everything (the same index as one process); the other ranks return ``None``.
    """
    from msif.retrieval.embed import as_encoder

    out_dir = Path(out_dir)
    if isinstance(corpus_path, Corpus):
        corpus = corpus_path
    else:
        corpus = Corpus(corpus_path, text_field=text_field, id_field=id_field, split=split)
    prepare_out_dir(out_dir, overwrite, "Index")
    encoder = as_encoder(model, device=device)
    n, d = len(corpus), int(encoder.dim)
    fp = corpus.fingerprint()
    fp["content_sha256"] = corpus.content_sha256()  # every row, so that a later edit anywhere is seen
    stamp = {"corpus": fp["sample_sha256"], "n": n, "model": getattr(encoder, "name", None), "dim": d}

    tmp = _tmp_dir(out_dir)
    progress_path = tmp / _PROGRESS_FILE
    w = world()
    # rank 0 alone owns the partial folder: it finds where an interrupted build stopped, writes the ids and
    # every embedding; the ranks embed blocks of rows in turn and send them to it
    err, done, emb = None, 0, None
    if w.main:
        try:
            done, emb = _open_partial(tmp, corpus, stamp, n, d, resume)
        except (InputError, StoredIndexError) as e:
            err = e
    err, done = broadcast_object((err, done), "starting the index build")
    if err is not None:
        raise err
    bar = None
    if progress and w.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, initial=done, unit="doc", desc="embedding corpus")
    # rows per unit of work: whole batches (so every rank embeds the batches one process would), about
    # CHECKPOINT_ROWS (the progress is written after each, so a killed build loses at most that much), and
    # small enough that a small corpus still gives every rank a share
    per_rank = -(-(n - done) // (w.size * batch_size))
    block = batch_size * max(1, min(-(-CHECKPOINT_ROWS // batch_size), per_rank))
    starts = list(range(done, n, block))
    for first in range(0, len(starts), w.size):
        part = None
        if first + w.rank < len(starts):
            lo = starts[first + w.rank]
            hi = min(lo + block, n)
            vecs = [encoder.encode(b.texts, batch_size=batch_size) for b in corpus.iter_batches(batch_size, start=lo, limit=hi - lo)]
            part = (lo, np.concatenate(vecs).astype(np.float32, copy=False))
        parts = gather_objects(part, "collecting the ranks' embeddings")
        if not w.main:
            continue
        for lo, vec in (q for q in parts if q is not None):
            emb[lo : lo + len(vec)] = vec
            if bar is not None:
                bar.update(len(vec))
        emb.flush()
        done = min(n, starts[min(first + w.size, len(starts)) - 1] + block)
        write_json_atomic(progress_path, {"stamp": stamp, "rows_done": done})
    if bar is not None:
        bar.close()
    if not w.main:
        barrier("writing the index")
        return None
    emb.flush()

    model_meta = {
        "name": getattr(encoder, "name", None),
        "dim": d,
        "normalized": True,
        "max_seq_length": getattr(encoder, "max_seq_length", None),
    }
    idx = _finish(
        tmp, out_dir, emb,
        index_type=index_type, index_params=index_params, model_meta=model_meta, corpus_meta=fp,
        target_recall=target_recall, calibration_k=calibration_k, calibration_queries=256,
        seed=seed, progress=progress, keep_embeddings=keep_embeddings, encoder=encoder,
    )  # fmt: skip
    barrier("writing the index")
    return idx


def _open_partial(tmp: Path, corpus: Corpus, stamp: dict, n: int, d: int, resume: bool):
    """``(rows already embedded, the embeddings memmap)`` of the partial build in ``tmp``: an interrupted
    build of the same corpus and model is continued, anything else started over (ids written first, so
    that duplicate ids fail before the expensive part)."""
    progress_path = tmp / _PROGRESS_FILE
    done = 0
    if resume and progress_path.is_file():
        try:
            state = json.loads(progress_path.read_text())
            if state.get("stamp") == stamp and (tmp / IDS_FILE).is_file() and (tmp / _EMB_FILE).is_file():
                done = int(state["rows_done"])
        except (OSError, ValueError, KeyError):
            done = 0
    if done == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if corpus.has_ids:
            id_batches = (b.ids for b in corpus.iter_batches(8192, field=None, check_ids=True))
        else:
            id_batches = ([str(i) for i in range(lo, min(lo + 65_536, n))] for lo in range(0, n, 65_536))
        _write_ids(tmp / IDS_FILE, id_batches)
        emb = np.lib.format.open_memmap(tmp / _EMB_FILE, mode="w+", dtype=np.float32, shape=(n, d))
        write_json_atomic(progress_path, {"stamp": stamp, "rows_done": 0})
        return 0, emb
    emb = np.load(tmp / _EMB_FILE, mmap_mode="r+")
    if emb.shape != (n, d):
        raise StoredIndexError(f"partial build {str(tmp)!r} has embeddings of shape {emb.shape}, expected {(n, d)}; delete it.")
    return done, emb


# --------------------------------------------------------------------------------------------------
# loading


def load_index(
    index_dir: str | os.PathLike,
    corpus: Corpus | str | os.PathLike | None = None,
    *,
    model=None,
    verify: bool = True,
    mmap: bool = False,
) -> VectorIndex:
    """Load an index written by :func:`build_index` / :func:`build_index_from_vectors`.

    Args:
        index_dir: the index folder.
        corpus: if given (path or ``Corpus``), it must be the corpus the index was built for
            (same row count and content sample), else :class:`StoredIndexError`.
        model: query encoder to use instead of the recorded model (must have the same dimension).
        verify: check the sha256 of every file (sizes are always checked).
        mmap: memory-map the FAISS index instead of reading it into RAM (IVF/flat).

    Raises :class:`StoredIndexError` for a missing, incomplete, truncated or corrupt index.
    """
    import faiss
    import pyarrow.parquet as pq

    folder = Path(index_dir)
    meta = read_meta(folder, FORMAT, "vector index")
    try:
        n = int(meta["n_docs"])
        int(meta["model"]["dim"])
        meta["index"]["type"]
        files = meta["files"]
    except (KeyError, TypeError, ValueError) as e:
        raise StoredIndexError(f"vector index {str(folder)!r} is corrupt: meta.json lacks {e}. Rebuild it.") from None
    if meta.get("version", 0) > VERSION:
        raise StoredIndexError(f"vector index {str(folder)!r} has format version {meta['version']}; this msif reads up to {VERSION}. Upgrade msif.")
    check_files(folder, files, verify, "vector index")
    try:
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        index = faiss.read_index(str(folder / INDEX_FILE), flags)
    except Exception as e:
        raise StoredIndexError(f"vector index {str(folder)!r} is corrupt: FAISS cannot read {INDEX_FILE} ({e}). Rebuild it.") from None
    try:
        ids = pq.read_table(folder / IDS_FILE).column("doc_id").combine_chunks()
    except Exception as e:
        raise StoredIndexError(f"vector index {str(folder)!r} is corrupt: cannot read {IDS_FILE} ({e}). Rebuild it.") from None
    if index.ntotal != n or len(ids) != n or index.d != int(meta["model"]["dim"]):
        raise StoredIndexError(
            f"vector index {str(folder)!r} is inconsistent: meta says {n} docs of dim {meta['model']['dim']}, "
            f"FAISS holds {index.ntotal} of dim {index.d}, {len(ids)} doc ids. Rebuild it."
        )
    encoder = None
    if model is not None:
        from msif.retrieval.embed import as_encoder

        encoder = as_encoder(model)
        _check_encoder(encoder, meta, folder)
    vi = VectorIndex(folder, meta, index, ids, encoder=encoder)
    if corpus is not None:
        vi.check_corpus(corpus)
    else:
        _warn_if_corpus_changed(meta, folder)
    return vi


def _warn_if_corpus_changed(meta: dict, folder: Path) -> None:
    """Cheap check without a corpus argument: warn if the recorded corpus file's size/mtime moved."""
    stored = meta.get("corpus") or {}
    p = Path(stored.get("path", ""))
    if not stored or not p.is_file():  # folders and missing/moved corpora: nothing cheap to compare
        return
    st = p.stat()
    if st.st_size != stored.get("bytes") or st.st_mtime_ns != stored.get("mtime_ns"):
        warnings.warn(
            f"The corpus {str(p)!r} changed on disk since index {str(folder)!r} was built; row numbers and ids "
            "may no longer match. Pass corpus= to load_index to check its content, or rebuild the index.",
            stacklevel=3,
        )
