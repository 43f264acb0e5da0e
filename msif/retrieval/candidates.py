"""Which documents a query's influence is computed for, and the text they are retrieved with
(docs/method.md §4): the one place the CLI, the demo and the benchmarks build candidates.

* :func:`query_text` — the retrieval text of a query: its question (the prompt as the user wrote it,
  without the template) and, when known, its answer.
* :func:`select_candidates` — per query, candidate corpus rows (best first) and their retrieval
  scores, from an embedding index, BM25 or TF-IDF; or every document (``None``, streamed).
* :func:`score_matrix` — a search's hits as a dense ``(queries, documents)`` score matrix.
* :func:`cached_index` — an embedding index kept in a cache folder, rebuilt when it no longer loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.encoding import InputError

RETRIEVERS = ("auto", "all", "bm25", "tfidf", "embedding")
AUTO_ALL_LIMIT = 20_000  # --retriever auto scores every document of a corpus up to this size


def query_text(question: str, answer: str | None = None) -> str:
    """``"question answer"``: what candidates are retrieved with (the answer left out when unknown)."""
    answer = (answer or "").strip()
    return question.strip() + (" " + answer if answer else "")


@dataclass
class Candidates:
    """Per query: corpus rows, best first, and their retrieval scores (``None``: every document)."""

    rows: list[list[int] | None]
    scores: list[list[float] | None]


def _from_hits(hits) -> Candidates:
    rows = [[int(r) for r in rr if r >= 0] for rr in hits.rows]
    scores = [[float(s) for s, r in zip(ss, rr) if r >= 0] for ss, rr in zip(hits.scores, hits.rows)]
    if any(not r for r in rows):
        raise InputError("the retriever found no candidate document for a query; try another --retriever or a larger --candidates")
    return Candidates(rows, scores)


def select_candidates(corpus, texts: Sequence[str], k: int, index=None, retriever: str = "auto") -> Candidates:
    """Candidates of each query text over ``corpus`` (a :class:`msif.data.corpus.Corpus`).

    ``index``: an embedding index folder or a loaded :class:`~msif.retrieval.VectorIndex`, used
    unless ``retriever`` is ``bm25`` / ``tfidf``. Without one: ``bm25`` / ``tfidf`` build that lexical
    index over the corpus; ``all`` (and ``auto`` up to :data:`AUTO_ALL_LIMIT` documents) give
    ``None`` rows: every document, streamed without an O(N) row list.
    """
    if retriever not in RETRIEVERS:
        raise InputError(f"--retriever must be one of {', '.join(RETRIEVERS)}, not {retriever!r}")
    if retriever == "embedding" and index is None:
        raise InputError("--method embedding needs --index DIR (build it with `msif index CORPUS --out DIR`)")
    if index is not None and retriever not in ("bm25", "tfidf"):
        if isinstance(index, (str, Path)):
            from . import load_index

            index = load_index(index, corpus=corpus)
        return _from_hits(index.search(list(texts), k=k))
    if retriever in ("bm25", "tfidf"):
        from . import BM25Index, TfidfIndex

        return _from_hits((BM25Index if retriever == "bm25" else TfidfIndex).build(corpus).search(list(texts), k=k))
    if retriever == "auto" and len(corpus) > AUTO_ALL_LIMIT:
        raise InputError(
            f"the corpus has {len(corpus)} documents: select candidates with an embedding index (`msif index CORPUS --out DIR`, "
            "then --index DIR) or --retriever bm25; --retriever all scores every document"
        )
    return Candidates([None for _ in texts], [None for _ in texts])


def score_matrix(hits, n_docs: int) -> np.ndarray:
    """``(queries, n_docs)`` float64: each hit's score at its row, 0 elsewhere."""
    M = np.zeros((len(hits.rows), n_docs), np.float64)
    for i in range(len(hits.rows)):
        ok = hits.rows[i] >= 0
        M[i, hits.rows[i][ok]] = hits.scores[i][ok]
    return M


def cached_index(corpus_path, folder, keep_embeddings: bool = False):
    """The exact embedding index of ``corpus_path`` kept in ``folder``: loaded when it is there, still
    matches the corpus (and holds the embeddings, with ``keep_embeddings``), else built anew."""
    from . import build_index, load_index
    from .common import StoredIndexError

    folder = Path(folder)
    if (folder / "meta.json").is_file() and (not keep_embeddings or (folder / "embeddings.npy").is_file()):
        try:
            return load_index(folder, corpus=corpus_path)
        except (StoredIndexError, OSError, ValueError):
            pass
    return build_index(corpus_path, folder, index_type="flat", progress=False, overwrite=True, keep_embeddings=keep_embeddings)
