"""Streaming readers for pre-training corpora: JSON lines, Parquet, or a saved ``datasets`` folder.

A corpus is a sequence of rows (records). Each row has a text field (``text_field``, default
``"text"``) and optionally an id field (``id_field``, default ``"id"``). Rows are numbered from 0 in
file order; the *doc id* of a row is the corpus's own id (always as a string) when the corpus has an
id field, else the row number as a string.

Nothing here holds the whole corpus in memory:

* **JSONL** (``.jsonl``, ``.ndjson``, ``.json`` holding one object per line) is streamed line by
  line. Random access (``corpus[i]``) uses a byte-offset index (one int64 per row), built on first
  use with a vectorised scan and cached on disk (see :class:`Corpus`, ``cache_dir``). Blank lines are
  skipped and do not count as rows.
* **Parquet** (a ``.parquet``/``.pq`` file, or a folder of them read in sorted path order) is read
  row group by row group, only the needed columns.
* **A ``datasets`` folder** (written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``)
  is memory-mapped Arrow; random access is a slice.

The readers live in :mod:`msif.data.jsonl` and :mod:`msif.data.columnar`, format detection in
:mod:`msif.data.formats`; this module holds the :class:`Corpus` over them.

Every user-facing problem (missing file, unknown format, missing field, a line that is not JSON, an
empty corpus, duplicate ids) raises :class:`msif.data.encoding.InputError` with the file, the row and
the fix in the message.

Typical use::

    corpus = Corpus("pile_sample.jsonl", text_field="text", id_field="id")
    len(corpus), corpus.doc_id(0), corpus.text(0)
    for batch in corpus.iter_batches(1024):     # CorpusBatch(start, texts, ids)
        ...
    for record in iter_records("pile.parquet", fields=["text"], limit=10):
        ...
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from msif.data.columnar import DatasetsBackend, ParquetBackend
from msif.data.encoding import InputError
from msif.data.formats import SUPPORTED_FORMATS, detect_format
from msif.data.identity import content_sha256, corpus_fingerprint, corpus_matches, fingerprints_match
from msif.data.jsonl import JsonlBackend

__all__ = [
    "Corpus",
    "CorpusBatch",
    "iter_records",
    "open_corpus",
    "detect_format",
    "fingerprints_match",
    "corpus_matches",
    "SUPPORTED_FORMATS",
]

DEFAULT_ID_FIELD = "id"


@dataclass
class CorpusBatch:
    """A run of consecutive rows: ``texts[j]`` and ``ids[j]`` belong to row ``start + j``.

    ``texts`` holds the values of the field asked for in :meth:`Corpus.iter_batches` (the text field
    by default); ``values`` is an alias.
    """

    start: int
    texts: list
    ids: list[str]

    @property
    def values(self) -> list:
        """Alias of ``texts`` for batches of a field other than the text."""
        return self.texts

    @property
    def rows(self) -> range:
        """Row numbers of this batch."""
        return range(self.start, self.start + len(self.texts))

    def __len__(self) -> int:
        return len(self.texts)


class Corpus:
    """Random access and streaming over a corpus on disk, without loading its text into memory.

    Args:
        path: a JSONL file, a Parquet file or folder of Parquet files, or a ``save_to_disk`` folder.
        text_field: the field holding the document text (``None``: no text field is needed, e.g. to
            read other fields only).
        id_field: the field holding each document's id. With the default ``"id"``, a corpus without
            such a field uses row numbers as ids; any other name must exist. ``None`` always uses
            row numbers.
        format: ``"jsonl"``, ``"parquet"`` or ``"datasets"`` to override detection.
        split: the split to use when ``path`` is a saved ``DatasetDict``.
        cache_dir: where the JSONL byte-offset index is cached (default ``$MSIF_CACHE_DIR`` or
            ``~/.cache/msif/jsonl-offsets``; the cache is keyed by path and invalidated by a change
            of size or mtime). ``False`` disables the on-disk cache.

    ``len(corpus)``, ``corpus[i]`` (the row as a dict), :meth:`text`, :meth:`doc_id`,
    :meth:`records`, :meth:`iter_records`, :meth:`iter_batches`, :meth:`row_of`.
    For JSONL, ``len`` and random access build the offset index on first use (one sequential scan).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        text_field: str | None = "text",
        id_field: str | None = DEFAULT_ID_FIELD,
        format: str | None = None,
        split: str | None = None,
        cache_dir: str | os.PathLike | bool | None = None,
    ):
        self.path = Path(path)
        fmt = format or detect_format(self.path)
        if format is not None and not self.path.exists():
            detect_format(self.path)  # raises the missing-file error
        if fmt == "jsonl":
            if self.path.is_dir():
                raise InputError(f"{str(self.path)!r} is a folder; format='jsonl' needs a file.")
            self._b = JsonlBackend(self.path, cache_dir)
        elif fmt == "parquet":
            self._b = ParquetBackend(self.path)
        elif fmt == "datasets":
            self._b = DatasetsBackend(self.path, split)
        else:
            raise InputError(f"Unknown corpus format {fmt!r}; use one of 'jsonl', 'parquet', 'datasets'.")
        self.format = fmt
        self.split = split
        self.text_field = text_field
        cols = self._b.columns
        if text_field is not None and text_field not in cols:
            raise InputError(
                f"Corpus {str(self.path)!r} has no field {text_field!r} "
                f"({'in its first row; ' if fmt == 'jsonl' else ''}fields: {cols}). "
                "Pass text_field=<name> (CLI: --text-field)."
            )
        if id_field is not None and id_field not in cols:
            if id_field != DEFAULT_ID_FIELD:
                raise InputError(
                    f"Corpus {str(self.path)!r} has no id field {id_field!r} "
                    f"({'in its first row; ' if fmt == 'jsonl' else ''}fields: {cols}). Pass "
                    "id_field=<name> (CLI: --id-field), or id_field=None to use row numbers as ids."
                )
            id_field = None
        self.id_field = id_field
        self._row_of: dict[str, int] | None = None

    # ---------------------------------------------------------------- size and identity
    @property
    def columns(self) -> list[str]:
        """Field names (for JSONL: the keys of the first row)."""
        return list(self._b.columns)

    @property
    def has_ids(self) -> bool:
        """Whether doc ids come from the corpus's own id field (else they are row numbers)."""
        return self.id_field is not None

    def __len__(self) -> int:
        return self._b.n_rows()

    def __repr__(self) -> str:
        return f"Corpus({str(self.path)!r}, format={self.format!r}, text_field={self.text_field!r}, id_field={self.id_field!r})"

    # ---------------------------------------------------------------- random access
    def _check_row(self, i: int) -> int:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {i} out of range for a corpus of {n} rows ({self.path})")
        return i

    def __getitem__(self, i: int) -> dict:
        """Row ``i`` as a dict of all its fields (negative indices count from the end)."""
        return self._b.read([self._check_row(i)], None)[0]

    def records(self, rows: Sequence[int], fields: Sequence[str] | None = None) -> list[dict]:
        """Rows ``rows`` (any order, repeats allowed) as dicts, restricted to ``fields`` if given."""
        rows = [self._check_row(r) for r in rows]
        cols = self._cols(fields)
        recs = self._b.read(rows, cols)
        if fields is not None:
            for r, rec in zip(rows, recs):
                self._require(rec, fields, r)
        return recs

    def text(self, i: int) -> str:
        """The text of row ``i``."""
        return self.texts([i])[0]

    def texts(self, rows: Sequence[int]) -> list[str]:
        """The texts of ``rows``, in that order (grouped reads: cheap for retrieval results)."""
        field = self._text_field()
        rows = [self._check_row(r) for r in rows]
        recs = self._b.read(rows, self._cols([field]))
        return [self._text_of(rec, r, field) for r, rec in zip(rows, recs)]

    def doc_id(self, i: int) -> str:
        """The doc id of row ``i``: the corpus's own id as a string, or the row number as a string."""
        return self.doc_ids([i])[0]

    def doc_ids(self, rows: Sequence[int]) -> list[str]:
        """Doc ids of ``rows``, in that order."""
        rows = [self._check_row(r) for r in rows]
        if self.id_field is None:
            return [str(r) for r in rows]
        recs = self._b.read(rows, self._cols([self.id_field]))
        return [self._id_of(rec, r) for r, rec in zip(rows, recs)]

    def row_of(self, doc_id: str) -> int:
        """Row number of ``doc_id``. The first call scans all ids (and checks they are unique)."""
        if self.id_field is None:
            try:
                r = int(doc_id)
            except ValueError:
                raise KeyError(doc_id) from None
            if str(r) != str(doc_id) or not 0 <= r < len(self):
                raise KeyError(doc_id)
            return r
        if self._row_of is None:
            seen: dict[str, int] = {}
            for _ in self.iter_batches(8192, field=None, check_ids=True, _seen=seen):
                pass
            self._row_of = seen
        return self._row_of[str(doc_id)]

    # ---------------------------------------------------------------- streaming
    def iter_records(
        self, fields: Sequence[str] | None = None, start: int = 0, limit: int | None = None, batch_size: int = 1024
    ) -> Iterator[dict]:
        """Yield rows ``start .. start+limit-1`` as dicts (all fields, or only ``fields``).

        Each dict also carries the doc id under ``id_field`` (``"id"`` when the corpus has no id
        field), always as a string.
        """
        key = self.id_field or DEFAULT_ID_FIELD
        cols = self._cols(fields)
        if cols is not None and self.id_field is not None and self.id_field not in cols:
            cols = list(cols) + [self.id_field]
        for first, recs in self._stream(start, limit, cols, batch_size):
            for j, rec in enumerate(recs):
                row = first + j
                doc_id = self._id_of(rec, row) if self.id_field is not None else str(row)
                if fields is not None:
                    self._require(rec, fields, row)
                    rec = {f: rec[f] for f in fields}
                rec[key] = doc_id
                yield rec

    def iter_batches(
        self,
        batch_size: int = 1024,
        field: str | None = "__text__",
        *,
        start: int = 0,
        limit: int | None = None,
        check_ids: bool = False,
        _seen: dict | None = None,
    ) -> Iterator[CorpusBatch]:
        """Stream the corpus as :class:`CorpusBatch` es of ``batch_size`` consecutive rows.

        ``field`` selects what ``batch.texts`` holds: the text field by default, any other field by
        name, or nothing (``None``, only ids). With ``check_ids=True`` a duplicate doc id raises
        :class:`InputError` naming both rows.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if field == "__text__":
            field = self._text_field()
        cols = [c for c in (field, self.id_field) if c is not None]
        seen = _seen if _seen is not None else ({} if check_ids else None)
        for first, recs in self._stream(start, limit, cols, batch_size):
            if field is None:
                values = [None] * len(recs)
            elif field == self.text_field:
                values = [self._text_of(rec, first + j, field) for j, rec in enumerate(recs)]
            else:
                values = []
                for j, rec in enumerate(recs):
                    self._require(rec, [field], first + j)
                    values.append(rec[field])
            if self.id_field is None:
                ids = [str(first + j) for j in range(len(recs))]
            else:
                ids = [self._id_of(rec, first + j) for j, rec in enumerate(recs)]
                if seen is not None:
                    for j, d in enumerate(ids):
                        prev = seen.setdefault(d, first + j)
                        if prev != first + j:
                            raise InputError(
                                f"Corpus {str(self.path)!r}: doc id {d!r} appears at rows {prev} and "
                                f"{first + j} (field {self.id_field!r}). Ids must be unique; fix the data, "
                                "or pass id_field=None to use row numbers as ids."
                            )
            yield CorpusBatch(first, values, ids)

    def validate(self, batch_size: int = 4096) -> int:
        """Read every row once: valid records, a text (if ``text_field``) and unique ids. Returns len."""
        n = 0
        field = self.text_field
        for b in self.iter_batches(batch_size, field=field, check_ids=True):
            n += len(b)
        if n == 0:
            raise InputError(f"Corpus {str(self.path)!r} is empty.")
        return n

    # ---------------------------------------------------------------- fingerprint
    def fingerprint(self, n_sample: int = 64) -> dict:
        """A small description that identifies this corpus's content.

        ``n_rows`` and ``sample_sha256`` (a hash of the ids and texts of the first, last and
        ``n_sample`` evenly spaced rows) identify the content; ``bytes`` and ``mtime_ns`` are recorded
        for information (a copied file keeps its content but not its mtime).
        """
        return corpus_fingerprint(self, n_sample)

    def content_sha256(self, batch_size: int = 4096) -> str:
        """A hash of every row's id and text, in order: one read pass (an index stores it, so that an
        edit anywhere in the corpus is seen, not only in :meth:`fingerprint`'s sampled rows)."""
        return content_sha256(self, batch_size)

    # ---------------------------------------------------------------- helpers
    def _stream(self, start, limit, cols, size):
        if start < 0:
            raise ValueError("start must be >= 0")
        stop = None if limit is None else start + max(int(limit), 0)
        if stop is not None and stop <= start:
            return iter(())
        return _rebatch(self._b.stream(int(start), stop, cols, int(size)), int(size))

    def _cols(self, fields):
        if fields is None:
            return None
        if self.format != "jsonl":
            missing = [f for f in fields if f not in self._b.columns]
            if missing:
                raise InputError(
                    f"Corpus {str(self.path)!r} has no field(s) {missing} (fields: {self._b.columns}). "
                    "Check the field names (CLI: --text-field / --id-field)."
                )
        return list(dict.fromkeys(fields))

    def _text_field(self) -> str:
        if self.text_field is None:
            raise InputError("This Corpus was opened with text_field=None; pass text_field=<name> to read text.")
        return self.text_field

    def _require(self, rec: dict, fields, row: int):
        for f in fields:
            if f not in rec:
                raise InputError(
                    f"Corpus {str(self.path)!r}: {self._where(row)} has no field {f!r} (it has "
                    f"{sorted(rec)}). Add it to that row, or pick another field name."
                )

    def _where(self, row: int) -> str:
        if isinstance(self._b, JsonlBackend):
            return self._b._where(row, None)
        return f"row {row}"

    def _text_of(self, rec: dict, row: int, field: str) -> str:
        if field not in rec:
            self._require(rec, [field], row)
        t = rec[field]
        if not isinstance(t, str):
            raise InputError(
                f"Corpus {str(self.path)!r}: {self._where(row)} has {field}={t!r} "
                f"({type(t).__name__}), not a string. Every row needs a text; fix or drop that row."
            )
        return t

    def _id_of(self, rec: dict, row: int) -> str:
        f = self.id_field
        if f not in rec:
            self._require(rec, [f], row)
        v = rec[f]
        if v is None or (isinstance(v, str) and v == ""):
            raise InputError(
                f"Corpus {str(self.path)!r}: {self._where(row)} has an empty id ({f}={v!r}). Give every "
                "row an id, or pass id_field=None to use row numbers as ids."
            )
        if isinstance(v, (dict, list)):
            raise InputError(f"Corpus {str(self.path)!r}: {self._where(row)} has a non-scalar id {f}={v!r}.")
        return str(v)


def _rebatch(chunks, size: int):
    """Regroup contiguous ``(first_row, records)`` chunks (e.g. cut at row-group borders) into ``size``."""
    buf: list = []
    first = None
    for start, recs in chunks:
        if first is None:
            first = start
        buf.extend(recs)
        while len(buf) >= size:
            yield first, buf[:size]
            buf = buf[size:]
            first += size
    if buf:
        yield first, buf


def open_corpus(path: str | os.PathLike | Corpus, **kwargs) -> Corpus:
    """Return ``path`` if it already is a :class:`Corpus`, else ``Corpus(path, **kwargs)``."""
    if isinstance(path, Corpus):
        return path
    return Corpus(path, **kwargs)


def iter_records(
    path: str | os.PathLike,
    fields: Sequence[str] | None = None,
    id_field: str | None = DEFAULT_ID_FIELD,
    start: int = 0,
    limit: int | None = None,
    *,
    format: str | None = None,
    split: str | None = None,
    batch_size: int = 1024,
) -> Iterator[dict]:
    """Stream the records of the corpus at ``path`` as dicts, without building any index.

    Yields rows ``start`` .. ``start + limit - 1`` (all if ``limit`` is None), each with the requested
    ``fields`` (all if None; a row lacking one raises :class:`InputError`) plus its doc id, as a
    string, under ``id_field`` (the row number when the corpus has no such field).
    """
    corpus = Corpus(path, text_field=None, id_field=id_field, format=format, split=split, cache_dir=False)
    yield from corpus.iter_records(fields=fields, start=start, limit=limit, batch_size=batch_size)
