"""A built vector index on disk: :class:`VectorIndex` (search by text or by vector) and :func:`load_index`,
which checks the folder's files, the FAISS header, the counts and (given the corpus) the corpus."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from msif.data.corpus import Corpus, corpus_matches, open_corpus
from msif.data.encoding import InputError
from msif.retrieval.common import Hits, StoredIndexError, as_query_list, check_files, ids_for_rows, read_meta
from msif.retrieval.faiss_index import set_search_params

FORMAT = "msif-vector-index"
VERSION = 1
INDEX_FILE = "index.faiss"
IDS_FILE = "doc_ids.parquet"


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
        set_search_params(faiss_index, self.kind, self.search_params)

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
        set_search_params(self.faiss_index, self.kind, self.search_params)

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
    folder = Path(index_dir)
    meta = _checked_meta(folder, verify)
    index, ids = _read_index_files(folder, meta, mmap)
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


def _checked_meta(folder: Path, verify: bool) -> dict:
    """``meta.json`` of the index in ``folder``, with its required entries, a readable format version, and
    every file's size (and with ``verify`` its sha256) as recorded."""
    meta = read_meta(folder, FORMAT, "vector index")
    try:
        int(meta["n_docs"])
        int(meta["model"]["dim"])
        meta["index"]["type"]
        files = meta["files"]
    except (KeyError, TypeError, ValueError) as e:
        raise StoredIndexError(f"vector index {str(folder)!r} is corrupt: meta.json lacks {e}. Rebuild it.") from None
    if meta.get("version", 0) > VERSION:
        raise StoredIndexError(f"vector index {str(folder)!r} has format version {meta['version']}; this msif reads up to {VERSION}. Upgrade msif.")
    check_files(folder, files, verify, "vector index")
    return meta


def _read_index_files(folder: Path, meta: dict, mmap: bool):
    """``(FAISS index, doc ids)`` from ``folder``, checked against each other and the counts in ``meta``."""
    import faiss
    import pyarrow.parquet as pq

    n = int(meta["n_docs"])
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
    return index, ids


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
