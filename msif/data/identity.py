"""What identifies a corpus's content: the sampled fingerprint an index or a fit stores, the full-content
hash, and the checks that compare them with the corpus on disk now."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from msif.data.corpus import Corpus


def corpus_fingerprint(corpus: "Corpus", n_sample: int = 64) -> dict:
    """:meth:`Corpus.fingerprint`: size, fields and a hash of the first, last and ``n_sample`` spaced rows."""
    n = len(corpus)
    files = [corpus.path] if corpus.path.is_file() else [q for q in sorted(corpus.path.rglob("*")) if q.is_file()]
    size = sum(q.stat().st_size for q in files)
    mtime = max(q.stat().st_mtime_ns for q in files)
    rows = sorted(set(list(range(min(n, 8))) + list(range(max(n - 8, 0), n)) + np.linspace(0, n - 1, min(n, n_sample)).astype(int).tolist()))
    h = hashlib.sha256()
    h.update(f"{n}|{corpus.text_field}|{corpus.id_field}".encode())
    texts = corpus.texts(rows) if corpus.text_field is not None else [""] * len(rows)
    for r, d, t in zip(rows, corpus.doc_ids(rows), texts):
        h.update(f"\x00{r}\x00{d}\x00".encode())
        h.update(t.encode("utf-8", "surrogatepass"))
    return {
        "path": str(corpus.path.resolve()),
        "format": corpus.format,
        "split": corpus.split,
        "text_field": corpus.text_field,
        "id_field": corpus.id_field,
        "n_rows": n,
        "bytes": size,
        "mtime_ns": mtime,
        "sample_sha256": h.hexdigest(),
    }


def content_sha256(corpus: "Corpus", batch_size: int = 4096) -> str:
    """:meth:`Corpus.content_sha256`: a hash of every row's id and text, in order (one read pass)."""
    h = hashlib.sha256()
    h.update(f"{len(corpus)}|{corpus.text_field}|{corpus.id_field}".encode())
    field = corpus.text_field if corpus.text_field is not None else None
    for b in corpus.iter_batches(batch_size, field=field):
        for j, (d, t) in enumerate(zip(b.ids, b.texts)):
            h.update(f"\x00{b.start + j}\x00{d}\x00".encode())
            h.update(("" if t is None else str(t)).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def fingerprints_match(stored: dict, current: dict) -> str | None:
    """``None`` when two :meth:`Corpus.fingerprint` s describe the same content, else the reason."""
    for key in ("n_rows", "text_field", "id_field", "sample_sha256"):
        if stored.get(key) != current.get(key):
            if key == "sample_sha256":
                return "the sampled rows' ids/texts differ (the corpus content changed)"
            return f"{key} differs ({stored.get(key)!r} when built, {current.get(key)!r} now)"
    return None


def corpus_matches(stored: dict, corpus: "Corpus") -> str | None:
    """:func:`fingerprints_match`, and where ``stored`` holds a :meth:`Corpus.content_sha256`, every row:
    re-hashed (one read pass) only when the files' size or modification time changed since then."""
    current = corpus.fingerprint()
    why = fingerprints_match(stored, current)
    if why is not None or "content_sha256" not in stored:
        return why
    if (stored.get("bytes"), stored.get("mtime_ns")) == (current["bytes"], current["mtime_ns"]):
        return None
    if corpus.content_sha256() != stored["content_sha256"]:
        return "a row's id or text differs (the corpus was edited since)"
    return None
