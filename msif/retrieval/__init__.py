"""Candidate selection (paper §4.3): embedding nearest neighbours, BM25 and TF-IDF.

* :func:`build_index` / :func:`load_index` — a FAISS index over a corpus's sentence embeddings
  (exact below 50k documents, IVF with calibrated ``nprobe`` above), persisted with metadata.
* :class:`BM25Index`, :class:`TfidfIndex` — word-level lexical retrieval.
* :func:`load_encoder` — the Sentence-Transformers model (bundled all-MiniLM-L6-v2 by default).

Every ``search(queries, k)`` returns :class:`Hits` ``(doc_ids, scores, rows)``.
"""

from msif.retrieval.common import Hits, StoredIndexError
from msif.retrieval.embed import DEFAULT_MODEL, SentenceEncoder, load_encoder
from msif.retrieval.index import VectorIndex, build_index, build_index_from_vectors, load_index
from msif.retrieval.lexical import BM25Index, TfidfIndex

__all__ = [
    "Hits",
    "StoredIndexError",
    "DEFAULT_MODEL",
    "SentenceEncoder",
    "load_encoder",
    "VectorIndex",
    "build_index",
    "build_index_from_vectors",
    "load_index",
    "BM25Index",
    "TfidfIndex",
]
