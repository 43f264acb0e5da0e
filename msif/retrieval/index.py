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

This module builds; :mod:`msif.retrieval.vector_index` holds the loaded index and :func:`load_index`,
:mod:`msif.retrieval.faiss_index` the FAISS construction and calibration, :mod:`msif.retrieval.exact`
exact search. Their public names are importable from here too.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from msif.data.corpus import Corpus, open_corpus
from msif.data.encoding import InputError
from msif.distributed import barrier, broadcast_object, gather_objects, world
from msif.retrieval.common import StoredIndexError, commit_dir, file_digest, prepare_out_dir, write_json_atomic
from msif.retrieval.exact import exact_topk, recall_at_k
from msif.retrieval.faiss_index import calibrate_search, make_faiss, set_search_params
from msif.retrieval.vector_index import FORMAT, IDS_FILE, INDEX_FILE, VERSION, VectorIndex, load_index

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

AUTO_FLAT_MAX_DOCS = 50_000
_EMB_FILE = "embeddings.npy"
_PROGRESS_FILE = "progress.json"
#: rows embedded (per rank) between two progress checkpoints of a build
CHECKPOINT_ROWS = 1024
_METRIC = "inner_product on L2-normalised vectors (cosine)"


def _choose_type(index_type: str, n: int) -> str:
    t = (index_type or "auto").lower()
    if t == "auto":
        return "flat" if n < AUTO_FLAT_MAX_DOCS else "ivf"
    if t not in ("flat", "ivf", "hnsw"):
        raise InputError(f"Unknown index_type {index_type!r}; use 'auto', 'flat', 'ivf' or 'hnsw'.")
    return t


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
    index, info = make_faiss(kind, vectors, dict(index_params or {}), seed, progress)
    search, calib = calibrate_search(index, kind, vectors, calibration_k, calibration_queries, target_recall, seed)
    set_search_params(index, kind, search)
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
    done, emb = _start_partial(tmp, corpus, stamp, n, d, resume)
    _embed_rows(corpus, encoder, emb, done, batch_size, tmp / _PROGRESS_FILE, stamp, progress)
    if not world().main:
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


def _start_partial(tmp: Path, corpus: Corpus, stamp: dict, n: int, d: int, resume: bool):
    """``(rows already embedded, embeddings memmap)`` on rank 0 (:func:`_open_partial`), ``(rows, None)``
    on the others. Rank 0 alone owns the partial folder: it finds where an interrupted build stopped,
    writes the ids and every embedding; the ranks embed blocks of rows in turn and send them to it."""
    w = world()
    err, done, emb = None, 0, None
    if w.main:
        try:
            done, emb = _open_partial(tmp, corpus, stamp, n, d, resume)
        except (InputError, StoredIndexError) as e:
            err = e
    err, done = broadcast_object((err, done), "starting the index build")
    if err is not None:
        raise err
    return done, emb


def _embed_rows(corpus: Corpus, encoder, emb, done: int, batch_size: int, progress_path: Path, stamp: dict,
                progress: bool) -> None:
    """Embed rows ``done ..`` of ``corpus`` into ``emb`` (rank 0's memmap), the ranks taking blocks in turn,
    and record the rows done in ``progress_path`` after every round."""
    w = world()
    n = len(corpus)
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
