"""Shared pieces of the retrieval indexes: the result type, atomic folder writes, file checksums."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np

from msif.atomic import atomic_write_text
from msif.data.encoding import InputError


class StoredIndexError(InputError):
    """A stored index is missing, corrupt, truncated, or was built for another corpus / model."""


class Hits(NamedTuple):
    """Search results for a batch of ``Q`` queries, best first.

    * ``doc_ids`` — ``Q`` lists of ``k`` doc ids (the corpus's ids, as strings),
    * ``scores`` — ``(Q, k)`` float32 similarities (cosine for embeddings, BM25 / TF-IDF cosine
      for the lexical indexes),
    * ``rows`` — ``(Q, k)`` int64 corpus row numbers.

    When an index returns fewer than ``k`` results for a query (an approximate index that probed
    too few cells), the missing slots hold ``None`` / ``-inf`` / ``-1``.
    """

    doc_ids: list
    scores: np.ndarray
    rows: np.ndarray


def as_query_list(queries) -> list[str]:
    """Accept one query string or a sequence of them; always return a list of strings."""
    if isinstance(queries, str):
        return [queries]
    queries = list(queries)
    for q in queries:
        if not isinstance(q, str):
            raise InputError(f"queries must be strings; got {type(q).__name__}: {q!r}")
    return queries


def ids_for_rows(doc_ids, rows: np.ndarray) -> list[list]:
    """Map a ``(Q, k)`` array of rows (``-1`` = missing) to lists of doc ids via a pyarrow array."""
    flat = rows.reshape(-1)
    valid = flat >= 0
    taken = doc_ids.take(np.where(valid, flat, 0)).to_pylist() if len(flat) else []
    out = [d if v else None for d, v in zip(taken, valid)]
    k = rows.shape[1] if rows.ndim == 2 else 0
    return [out[i * k : (i + 1) * k] for i in range(rows.shape[0])]


def file_digest(path: Path, chunk: int = 1 << 22) -> dict:
    """``{"bytes": size, "sha256": hex}`` of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def check_files(folder: Path, files: dict, verify: bool, what: str):
    """Raise :class:`StoredIndexError` if a file listed in ``files`` is missing, truncated or altered."""
    for name, want in files.items():
        p = folder / name
        if not p.is_file():
            raise StoredIndexError(f"{what} {str(folder)!r} is incomplete: {name} is missing. Rebuild it.")
        size = p.stat().st_size
        if size != want["bytes"]:
            raise StoredIndexError(
                f"{what} {str(folder)!r} is corrupt: {name} has {size} bytes, expected {want['bytes']} "
                "(truncated or overwritten). Rebuild it."
            )
        if verify and file_digest(p)["sha256"] != want["sha256"]:
            raise StoredIndexError(f"{what} {str(folder)!r} is corrupt: the checksum of {name} does not match. Rebuild it.")


def read_meta(folder: Path, kind: str, what: str) -> dict:
    """Read and sanity-check ``meta.json`` of a stored index of the given ``kind``."""
    folder = Path(folder)
    partial = any(folder.parent.glob(f".{folder.name}.partial*")) if folder.parent.is_dir() else False
    hint = " An unfinished (partial build) exists next to it; rerun the build to resume it." if partial else ""
    if not folder.exists():
        raise StoredIndexError(f"{what} {str(folder)!r} does not exist.{hint} Build it first (e.g. `msif index CORPUS --out DIR`).")
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise StoredIndexError(f"{str(folder)!r} is not a {what} (no meta.json).{hint}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoredIndexError(f"{what} {str(folder)!r} is corrupt: meta.json is not valid JSON ({e}). Rebuild it.") from None
    if not isinstance(meta, dict) or meta.get("format") != kind:
        raise StoredIndexError(f"{str(folder)!r} holds {meta.get('format') if isinstance(meta, dict) else meta!r}, not a {what}.")
    return meta


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to ``path`` atomically (:func:`msif.atomic.atomic_write_text`)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def prepare_out_dir(out_dir: Path, overwrite: bool, what: str) -> None:
    """Refuse to clobber an existing folder unless it is an index and ``overwrite`` is set."""
    from ..atomic import prepare_out_dir as prepare

    prepare(out_dir, overwrite, "index", marker="meta.json", flag="overwrite=True (CLI: --overwrite)")


def commit_dir(tmp_dir: Path, out_dir: Path) -> None:
    """Move a finished ``tmp_dir`` to ``out_dir``, replacing an old index there (rename, not copy)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.rename(out_dir, old)
    os.rename(tmp_dir, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
