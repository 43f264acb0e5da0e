"""Lexical candidate retrieval: BM25 (``bm25s``) and TF-IDF cosine (scikit-learn).

Both tokenise into **words** — lower-cased runs of two or more word characters (scikit-learn's
``(?u)\\b\\w\\w+\\b``), English stopwords removed. (The paper's research code split strings into
characters, which makes BM25 rank anagrams; :meth:`BM25Index.tokenize` shows the tokens.)

Both have the embedding index's shape: ``build(corpus)`` → ``search(queries, k)`` → :class:`Hits`
with the corpus's doc ids, ``save(dir)`` / ``load(dir)``. Only documents sharing at least one term
with the query are returned; when fewer than ``k`` do, the remaining slots are padding (``None`` /
``-inf`` / ``-1``). Ties are broken by row number.

The text is streamed from the corpus, but the term-document matrix lives in memory (as it does in
``bm25s`` and scikit-learn): roughly 8–12 bytes per distinct (term, document) pair.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from msif.data.corpus import Corpus
from msif.data.encoding import InputError
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

__all__ = ["BM25Index", "TfidfIndex", "TOKEN_PATTERN"]

TOKEN_PATTERN = r"(?u)\b\w\w+\b"
_IDS_FILE = "doc_ids.parquet"


def _texts_and_ids(source, doc_ids, text_field, id_field, batch_size) -> tuple[Iterable[list[str]], list | None]:
    """Turn a Corpus / path / list of texts into (iterable of text batches, ids or None=collect)."""
    if isinstance(source, (str, os.PathLike)):
        source = Corpus(source, text_field=text_field, id_field=id_field)
    if isinstance(source, Corpus):
        if doc_ids is not None:
            raise InputError("doc_ids come from the corpus; do not pass them with a Corpus.")
        return source, None
    texts = list(source)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(f"text {i} is a {type(t).__name__}, not a string.")
    if not texts:
        raise InputError("cannot build a lexical index over zero documents.")
    ids = [str(i) for i in range(len(texts))] if doc_ids is None else [str(d) for d in doc_ids]
    if len(ids) != len(texts):
        raise InputError(f"{len(ids)} doc ids for {len(texts)} texts.")
    if len(set(ids)) != len(ids):
        raise InputError("doc ids are not unique.")
    return [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)], ids


def _stream(source, ids, batch_size):
    """Yield text batches; for a Corpus also collect (and check) its doc ids into ``out_ids``."""
    out_ids: list[str] = []
    if isinstance(source, Corpus):

        def gen():
            for b in source.iter_batches(batch_size, check_ids=True):
                out_ids.extend(b.ids)
                yield b.texts

        return gen(), out_ids
    out_ids.extend(ids)
    return iter(source), out_ids


def _arrow_ids(ids: list[str]):
    import pyarrow as pa

    return pa.array(ids, pa.string())


def _save_ids(path: Path, ids) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"doc_id": ids}), path)


def _load_ids(path: Path):
    import pyarrow.parquet as pq

    return pq.read_table(path).column("doc_id").combine_chunks()


def _topk_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` positive entries of each row of ``scores`` (Q, N), ties by column; pads with -1."""
    q, n = scores.shape
    k = min(k, n)
    rows = np.full((q, k), -1, np.int64)
    out = np.full((q, k), -np.inf, np.float32)
    for j in range(q):
        s = scores[j]
        cand = np.flatnonzero(s > 0)
        if len(cand) > k:
            thr = np.partition(s[cand], len(cand) - k)[len(cand) - k]
            cand = cand[s[cand] >= thr]
        order = np.lexsort((cand, -s[cand]))[:k]
        rows[j, : len(order)] = cand[order]
        out[j, : len(order)] = s[cand[order]]
    return out, rows


def _write_folder(out_dir: Path, overwrite: bool, what: str, kind: str, fill) -> None:
    """Write an index folder atomically: ``fill(tmp)`` writes files and returns extra meta."""
    out_dir = Path(out_dir)
    prepare_out_dir(out_dir, overwrite, what)
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        extra = fill(tmp)
        files = {str(p.relative_to(tmp)): file_digest(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        meta = {"format": kind, "version": 1, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "files": files, **extra}
        write_json_atomic(tmp / "meta.json", meta)
        commit_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------------
# BM25


class BM25Index:
    """BM25 over word tokens (``bm25s``, Lucene variant by default).

    Build with :meth:`build`, query with :meth:`search`, persist with :meth:`save` / :meth:`load`.
    """

    FORMAT = "msif-bm25-index"

    def __init__(self, retriever, doc_ids, tokenizer_config: dict, params: dict):
        self.retriever = retriever
        self.doc_ids = doc_ids
        self.tokenizer_config = tokenizer_config
        self.params = params

    def __len__(self) -> int:
        return len(self.doc_ids)

    @classmethod
    def build(
        cls,
        source: Corpus | str | os.PathLike | Sequence[str],
        doc_ids: Sequence[str] | None = None,
        *,
        k1: float = 1.5,
        b: float = 0.75,
        method: str = "lucene",
        stopwords: str | list[str] | None = "en",
        lower: bool = True,
        text_field: str = "text",
        id_field: str | None = "id",
        batch_size: int = 4096,
        progress: bool = False,
    ) -> "BM25Index":
        """Index a corpus (``Corpus`` or path, streamed) or a list of texts (ids = ``doc_ids`` or rows)."""
        import bm25s

        batches, ids = _texts_and_ids(source, doc_ids, text_field, id_field, batch_size)
        text_batches, out_ids = _stream(batches, ids, batch_size)
        config = {"lower": lower, "token_pattern": TOKEN_PATTERN, "stopwords": _stopword_list(stopwords)}
        tok = _make_tokenizer(config)
        token_ids: list[list[int]] = []
        for texts in text_batches:
            token_ids.extend(tok.tokenize(list(texts), update_vocab=True, return_as="ids", show_progress=False))
        if not token_ids:
            raise InputError("cannot build a BM25 index over zero documents.")
        retriever = bm25s.BM25(k1=k1, b=b, method=method)
        retriever.index(tok.to_tokenized_tuple(token_ids), show_progress=progress)
        return cls(retriever, _arrow_ids(out_ids), config, {"k1": k1, "b": b, "method": method})

    def tokenize(self, texts: str | Sequence[str]) -> list[list[str]]:
        """Word tokens of each text as BM25 sees them (lower-cased, stopwords removed)."""
        # a fresh tokenizer each call: bm25s maps out-of-vocabulary words to "" unless it may grow its vocab
        tok = _make_tokenizer(self.tokenizer_config)
        out = tok.tokenize(as_query_list(texts), update_vocab=True, return_as="string", show_progress=False)
        return [[t for t in toks if t] for toks in out]

    def search(self, queries: str | Sequence[str], k: int = 100) -> Hits:
        """Top-``k`` documents by BM25 score for each query → :class:`Hits` (see module docstring)."""
        qs = as_query_list(queries)
        vocab = self.retriever.vocab_dict
        toks = [[t for t in q if t in vocab] for q in self.tokenize(qs)]
        n = len(self)
        k = int(min(max(k, 1), n))
        rows = np.full((len(qs), k), -1, np.int64)
        scores = np.full((len(qs), k), -np.inf, np.float32)
        live = [j for j, t in enumerate(toks) if t]
        if live:
            res = self.retriever.retrieve([toks[j] for j in live], k=k, show_progress=False, n_threads=0)
            docs, sc = np.asarray(res.documents, np.int64), np.asarray(res.scores, np.float32)
            for pos, j in enumerate(live):
                order = np.lexsort((docs[pos], -sc[pos]))
                keep = [o for o in order if sc[pos, o] > 0]
                rows[j, : len(keep)] = docs[pos, keep]
                scores[j, : len(keep)] = sc[pos, keep]
        return Hits(ids_for_rows(self.doc_ids, rows), scores, rows)

    def save(self, out_dir: str | os.PathLike, overwrite: bool = False) -> None:
        """Write the index to ``out_dir`` atomically (bm25s matrices, vocab, doc ids, meta.json)."""

        def fill(tmp: Path) -> dict:
            self.retriever.save(str(tmp / "bm25"), show_progress=False)
            _save_ids(tmp / _IDS_FILE, self.doc_ids)
            return {"n_docs": len(self), "tokenizer": self.tokenizer_config, "params": self.params}

        _write_folder(Path(out_dir), overwrite, "BM25 index", self.FORMAT, fill)

    @classmethod
    def load(cls, index_dir: str | os.PathLike, verify: bool = True) -> "BM25Index":
        """Load an index written by :meth:`save`; corrupt or incomplete folders raise ``StoredIndexError``."""
        import bm25s

        folder = Path(index_dir)
        meta = read_meta(folder, cls.FORMAT, "BM25 index")
        check_files(folder, meta.get("files", {}), verify, "BM25 index")
        try:
            retriever = bm25s.BM25.load(str(folder / "bm25"), show_progress=False)
            ids = _load_ids(folder / _IDS_FILE)
        except Exception as e:
            raise StoredIndexError(f"BM25 index {str(folder)!r} is corrupt ({type(e).__name__}: {e}). Rebuild it.") from None
        if len(ids) != meta.get("n_docs"):
            raise StoredIndexError(f"BM25 index {str(folder)!r} is inconsistent: {len(ids)} doc ids, meta says {meta.get('n_docs')}.")
        return cls(retriever, ids, meta["tokenizer"], meta["params"])


def _stopword_list(stopwords) -> list[str]:
    if stopwords is None:
        return []
    if isinstance(stopwords, str):
        from bm25s.stopwords import STOPWORDS_EN

        if stopwords.lower() not in ("en", "english"):
            raise InputError(f"stopwords={stopwords!r}: pass 'en', None, or a list of words.")
        return sorted(STOPWORDS_EN)
    return sorted(set(stopwords))


def _make_tokenizer(config: dict):
    from bm25s.tokenization import Tokenizer

    return Tokenizer(lower=config["lower"], splitter=config["token_pattern"], stopwords=config["stopwords"])


# --------------------------------------------------------------------------------------------------
# TF-IDF


class TfidfIndex:
    """TF-IDF vectors (scikit-learn, L2-normalised, sublinear tf) ranked by cosine similarity."""

    FORMAT = "msif-tfidf-index"

    def __init__(self, vectorizer, matrix, doc_ids, params: dict):
        self.vectorizer = vectorizer
        self.matrix = matrix.tocsr()  # (N, V), rows L2-normalised
        self.doc_ids = doc_ids
        self.params = params

    def __len__(self) -> int:
        return self.matrix.shape[0]

    @classmethod
    def build(
        cls,
        source: Corpus | str | os.PathLike | Sequence[str],
        doc_ids: Sequence[str] | None = None,
        *,
        stop_words: str | list[str] | None = "english",
        sublinear_tf: bool = True,
        min_df: int = 1,
        max_features: int | None = None,
        text_field: str = "text",
        id_field: str | None = "id",
        batch_size: int = 4096,
    ) -> "TfidfIndex":
        """Index a corpus (``Corpus`` or path, streamed) or a list of texts (ids = ``doc_ids`` or rows)."""
        from sklearn.feature_extraction.text import TfidfVectorizer

        batches, ids = _texts_and_ids(source, doc_ids, text_field, id_field, batch_size)
        text_batches, out_ids = _stream(batches, ids, batch_size)
        params = {
            "stop_words": stop_words,
            "sublinear_tf": sublinear_tf,
            "min_df": min_df,
            "max_features": max_features,
            "token_pattern": TOKEN_PATTERN,
            "lowercase": True,
            "norm": "l2",
            "dtype": "float32",
        }
        vec = TfidfVectorizer(**_sk_params(params))
        try:
            matrix = vec.fit_transform(t for texts in text_batches for t in texts)
        except ValueError as e:  # "empty vocabulary; perhaps the documents only contain stop words"
            raise InputError(f"TF-IDF could not be built: {e}.") from None
        return cls(vec, matrix, _arrow_ids(out_ids), params)

    def search(self, queries: str | Sequence[str], k: int = 100, chunk: int = 16) -> Hits:
        """Top-``k`` documents by TF-IDF cosine similarity for each query → :class:`Hits`."""
        qs = as_query_list(queries)
        k = int(min(max(k, 1), len(self)))
        q = self.vectorizer.transform(qs)
        all_s, all_r = [], []
        for lo in range(0, len(qs), chunk):
            dense = (q[lo : lo + chunk] @ self.matrix.T).toarray().astype(np.float32)
            s, r = _topk_rows(dense, k)
            all_s.append(s)
            all_r.append(r)
        scores = np.concatenate(all_s) if all_s else np.zeros((0, k), np.float32)
        rows = np.concatenate(all_r) if all_r else np.zeros((0, k), np.int64)
        return Hits(ids_for_rows(self.doc_ids, rows), scores, rows)

    def save(self, out_dir: str | os.PathLike, overwrite: bool = False) -> None:
        """Write vocabulary (JSON), idf (npy), the sparse matrix (npz) and doc ids; no pickles."""
        import scipy.sparse as sp

        def fill(tmp: Path) -> dict:
            vocab = {t: int(i) for t, i in self.vectorizer.vocabulary_.items()}
            (tmp / "vocabulary.json").write_text(json.dumps(vocab))
            np.save(tmp / "idf.npy", self.vectorizer.idf_)
            sp.save_npz(tmp / "matrix.npz", self.matrix)
            _save_ids(tmp / _IDS_FILE, self.doc_ids)
            return {"n_docs": len(self), "params": self.params}

        _write_folder(Path(out_dir), overwrite, "TF-IDF index", self.FORMAT, fill)

    @classmethod
    def load(cls, index_dir: str | os.PathLike, verify: bool = True) -> "TfidfIndex":
        """Load an index written by :meth:`save`; corrupt or incomplete folders raise ``StoredIndexError``."""
        import scipy.sparse as sp
        from sklearn.feature_extraction.text import TfidfVectorizer

        folder = Path(index_dir)
        meta = read_meta(folder, cls.FORMAT, "TF-IDF index")
        check_files(folder, meta.get("files", {}), verify, "TF-IDF index")
        try:
            vocab = json.loads((folder / "vocabulary.json").read_text())
            params = meta["params"]
            vec = TfidfVectorizer(vocabulary=vocab, **{k: v for k, v in _sk_params(params).items() if k not in ("min_df", "max_features")})
            vec.idf_ = np.load(folder / "idf.npy")
            matrix = sp.load_npz(folder / "matrix.npz")
            ids = _load_ids(folder / _IDS_FILE)
        except Exception as e:
            raise StoredIndexError(f"TF-IDF index {str(folder)!r} is corrupt ({type(e).__name__}: {e}). Rebuild it.") from None
        if matrix.shape != (meta.get("n_docs"), len(vocab)) or len(ids) != matrix.shape[0]:
            raise StoredIndexError(f"TF-IDF index {str(folder)!r} is inconsistent (matrix {matrix.shape}, {len(ids)} ids).")
        return cls(vec, matrix, ids, params)


def _sk_params(params: dict) -> dict:
    p = dict(params)
    p["dtype"] = np.float32 if p.get("dtype") == "float32" else np.float64
    if isinstance(p.get("stop_words"), list):
        p["stop_words"] = list(p["stop_words"])
    return p
