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

import bisect
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from msif.data.encoding import InputError

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

SUPPORTED_FORMATS = (
    "JSON lines (.jsonl, .ndjson, or .json with one object per line), Parquet (.parquet/.pq, or a "
    "folder of .parquet files), or a folder written by datasets' save_to_disk"
)
_JSONL_EXT = (".jsonl", ".ndjson", ".json")
_PARQUET_EXT = (".parquet", ".pq")
DEFAULT_ID_FIELD = "id"
_SCAN_CHUNK = 8 << 20  # bytes read at a time when building a JSONL offset index


# --------------------------------------------------------------------------------------------------
# format detection


def detect_format(path: str | os.PathLike) -> str:
    """Return ``"jsonl"``, ``"parquet"`` or ``"datasets"`` for ``path``; raise :class:`InputError`.

    Files are recognised by extension; folders by their content (``state.json`` or
    ``dataset_dict.json`` for a ``datasets`` folder, ``*.parquet`` files for a Parquet folder).
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"Corpus {str(p)!r} does not exist. Check the path (it is resolved from {os.getcwd()!r}).")
    if p.is_dir():
        if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
            return "datasets"
        if _parquet_files(p):
            return "parquet"
        raise InputError(
            f"Corpus folder {str(p)!r} is neither a datasets save_to_disk folder (no state.json or "
            f"dataset_dict.json) nor a folder of .parquet files. Supported: {SUPPORTED_FORMATS}."
        )
    name = p.name.lower()
    if name.endswith(_PARQUET_EXT):
        return "parquet"
    if name.endswith(_JSONL_EXT):
        return "jsonl"
    if name.endswith((".gz", ".bz2", ".xz", ".zst", ".zip")):
        raise InputError(
            f"Corpus {str(p)!r} is compressed; random access needs an uncompressed file. Decompress it "
            f"(e.g. `gunzip -k`) or convert it to Parquet. Supported: {SUPPORTED_FORMATS}."
        )
    raise InputError(
        f"Corpus {str(p)!r} has an unknown format (extension {p.suffix or 'none'!r}). Supported: "
        f"{SUPPORTED_FORMATS}. Rename the file if its content is one of these, or pass format=..."
    )


def _parquet_files(folder: Path) -> list[Path]:
    return sorted(q for q in folder.rglob("*") if q.is_file() and q.name.lower().endswith(_PARQUET_EXT))


# --------------------------------------------------------------------------------------------------
# backends: each exposes `columns`, `n_rows()`, `read(rows, cols)`, `stream(start, stop, cols, size)`
# `read` returns dicts in the order of `rows`; `stream` yields (first_row, list_of_dicts).


class _JsonlBackend:
    """Line-per-object JSON. Rows are the non-blank lines."""

    def __init__(self, path: Path, cache_dir):
        self.path = path
        self.cache_dir = cache_dir
        self._offsets: np.ndarray | None = None
        self._ends: np.ndarray | None = None
        first = self._first_record()
        if first is None:
            raise InputError(f"Corpus {str(path)!r} is empty (no non-blank lines). Point to a file with one JSON object per line.")
        self.columns = list(first.keys())

    # -- parsing
    def _parse(self, raw: bytes, row: int, line: int | None) -> dict:
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            where = self._where(row, line)
            msg = getattr(e, "msg", str(e))
            snippet = raw[:80].decode("utf-8", "replace")
            if row == 0 and raw.strip().startswith(b"["):
                raise InputError(
                    f"{str(self.path)!r} looks like a JSON array, not JSON lines. Write one object per line "
                    "(e.g. `jq -c '.[]' in.json > out.jsonl`)."
                ) from None
            raise InputError(
                f"{str(self.path)!r}: {where} is not valid JSON ({msg}): {snippet!r}. Each line of a "
                "JSONL corpus must be one JSON object; fix or delete that line."
            ) from None
        if not isinstance(rec, dict):
            if row == 0 and isinstance(rec, list):
                raise InputError(
                    f"{str(self.path)!r} holds a JSON array, not JSON lines. Write one object per line "
                    "(e.g. `jq -c '.[]' in.json > out.jsonl`)."
                )
            raise InputError(
                f"{str(self.path)!r}: {self._where(row, line)} is a JSON {type(rec).__name__}, not an "
                "object. Each line must be an object such as {\"id\": ..., \"text\": ...}."
            )
        return rec

    def _where(self, row: int, line: int | None) -> str:
        if line is None:
            line = self._line_of(row)
        return f"row {row} (line {line})"

    def _line_of(self, row: int) -> int:
        """1-based line number of ``row`` (only computed for error messages)."""
        off = int(self.offsets[row])
        count = 0
        with open(self.path, "rb") as f:
            remaining = off
            while remaining > 0:
                buf = f.read(min(_SCAN_CHUNK, remaining))
                if not buf:
                    break
                count += buf.count(b"\n")
                remaining -= len(buf)
        return count + 1

    def _first_record(self) -> dict | None:
        with open(self.path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                if raw.strip():
                    return self._parse(raw, 0, line_no)
        return None

    # -- offsets index
    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            self._offsets, self._ends = self._load_or_build_offsets()
        return self._offsets

    def _cache_paths(self) -> tuple[Path, Path] | None:
        if self.cache_dir is False:
            return None
        base = Path(self.cache_dir) if self.cache_dir else _default_cache_dir()
        key = hashlib.sha1(str(self.path.resolve()).encode()).hexdigest()[:20]
        return base / f"{key}.offsets.npy", base / f"{key}.offsets.json"

    def _load_or_build_offsets(self) -> tuple[np.ndarray, np.ndarray]:
        st = self.path.stat()
        stamp = {"path": str(self.path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "version": 1}
        paths = self._cache_paths()
        if paths is not None:
            npy, meta = paths
            try:
                if json.loads(meta.read_text()) == stamp:
                    both = np.load(npy, mmap_mode="r")
                    if both.ndim == 2 and both.shape[0] == 2:
                        return both[0], both[1]
            except (OSError, ValueError):
                pass
        starts, ends = _scan_line_offsets(self.path)
        if paths is not None:
            try:
                npy.parent.mkdir(parents=True, exist_ok=True)
                tmp = npy.with_name(npy.name + f".tmp{os.getpid()}.npy")
                np.save(tmp, np.stack([starts, ends]))
                os.replace(tmp, npy)
                tmp_meta = meta.with_name(meta.name + f".tmp{os.getpid()}")
                tmp_meta.write_text(json.dumps(stamp))
                os.replace(tmp_meta, meta)
            except OSError:
                pass  # an unwritable cache only costs a rescan next time
        return starts, ends

    def n_rows(self) -> int:
        return int(len(self.offsets))

    # -- access
    def read(self, rows: Sequence[int], cols) -> list[dict]:
        offs, ends = self.offsets, self._ends
        out = []
        with open(self.path, "rb") as f:
            for r in rows:
                f.seek(int(offs[r]))
                raw = f.read(int(ends[r]) - int(offs[r]))
                out.append(self._parse(raw, int(r), None))
        return out

    def stream(self, start: int, stop: int | None, cols, size: int) -> Iterator[tuple[int, list[dict]]]:
        row, line_no = 0, 0
        with open(self.path, "rb") as f:
            if start > 0 and self._offsets is not None:
                if start >= len(self._offsets):
                    return
                f.seek(int(self._offsets[start]))
                row, line_no = start, None  # line numbers unknown after a seek; computed on error
            batch, first = [], start
            for raw in f:
                if line_no is not None:
                    line_no += 1
                if not raw.strip():
                    continue
                if stop is not None and row >= stop:
                    break
                if row >= start:
                    batch.append(self._parse(raw, row, line_no))
                    if len(batch) == size:
                        yield first, batch
                        first, batch = row + 1, []
                row += 1
            if batch:
                yield first, batch


def _default_cache_dir() -> Path:
    env = os.environ.get("MSIF_CACHE_DIR")
    if env:
        return Path(env) / "jsonl-offsets"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "msif" / "jsonl-offsets"


_WS = np.zeros(256, dtype=bool)
_WS[[9, 10, 11, 12, 13, 32]] = True


def _scan_line_offsets(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Byte ``(starts, ends)`` of every non-blank line of ``path`` (``ends`` exclusive, before ``\\n``).

    Reads the file in chunks and finds newlines with numpy, so a multi-GB file takes seconds.
    A line is blank when it holds only whitespace.
    """
    starts_parts, ends_parts = [], []
    pos = 0  # absolute offset of the current chunk
    line_start = 0  # absolute offset where the unfinished line began
    carry = 0  # non-whitespace bytes seen so far in the unfinished line
    with open(path, "rb") as f:
        while True:
            buf = f.read(_SCAN_CHUNK)
            if not buf:
                break
            a = np.frombuffer(buf, dtype=np.uint8)
            nonws = np.concatenate([[0], np.cumsum(~_WS[a], dtype=np.int64)])  # prefix counts
            nl = np.flatnonzero(a == 10)
            if len(nl):
                local_starts = np.concatenate([[0], nl[:-1] + 1])
                counts = nonws[nl] - nonws[local_starts]
                counts[0] += carry
                s = local_starts + pos
                s[0] = line_start
                keep = counts > 0
                starts_parts.append(s[keep])
                ends_parts.append((nl + pos)[keep])
                line_start = int(nl[-1]) + 1 + pos
                carry = int(nonws[-1] - nonws[nl[-1] + 1])
            else:
                carry += int(nonws[-1])
            pos += len(buf)
    if carry > 0:  # last line without a trailing newline
        starts_parts.append(np.array([line_start]))
        ends_parts.append(np.array([pos]))
    if not starts_parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(starts_parts).astype(np.int64), np.concatenate(ends_parts).astype(np.int64)


class _ParquetBackend:
    """One Parquet file or a folder of them; rows are numbered across files in sorted path order."""

    def __init__(self, path: Path):
        import pyarrow.parquet as pq

        self.path = path
        self.files = _parquet_files(path) if path.is_dir() else [path]
        self._pf = []
        rg_starts, rg_index = [], []
        total = 0
        self.columns = None
        for fp in self.files:
            try:
                pf = pq.ParquetFile(fp)
            except Exception as e:  # pyarrow raises ArrowInvalid/OSError for non-parquet bytes
                raise InputError(f"{str(fp)!r} could not be read as Parquet ({e}). Is it a Parquet file?") from None
            names = list(pf.schema_arrow.names)
            if self.columns is None:
                self.columns = names
            elif set(names) != set(self.columns):
                raise InputError(
                    f"Parquet shard {str(fp)!r} has columns {names}, but {str(self.files[0])!r} has "
                    f"{self.columns}. All shards of a corpus must share one schema."
                )
            fi = len(self._pf)
            self._pf.append(pf)
            md = pf.metadata
            for g in range(md.num_row_groups):
                n = md.row_group(g).num_rows
                if n == 0:
                    continue
                rg_starts.append(total)
                rg_index.append((fi, g))
                total += n
        self._rg_starts = rg_starts
        self._rg_index = rg_index
        self._n = total
        self._cached_key = None
        self._cached_table = None
        if total == 0:
            raise InputError(f"Corpus {str(path)!r} is empty (0 rows). Point to a non-empty Parquet file.")

    def n_rows(self) -> int:
        return self._n

    def _group(self, g: int, cols):
        key = (g, tuple(cols) if cols is not None else None)
        if key != self._cached_key:
            fi, rg = self._rg_index[g]
            self._cached_table = self._pf[fi].read_row_group(rg, columns=cols)
            self._cached_key = key
        return self._cached_table

    def read(self, rows: Sequence[int], cols) -> list[dict]:
        out: list[Any] = [None] * len(rows)
        by_group: dict[int, list[tuple[int, int]]] = {}
        for pos, r in enumerate(rows):
            g = bisect.bisect_right(self._rg_starts, int(r)) - 1
            by_group.setdefault(g, []).append((pos, int(r) - self._rg_starts[g]))
        for g, items in by_group.items():
            table = self._group(g, cols)
            recs = table.take([local for _, local in items]).to_pylist()
            for (pos, _), rec in zip(items, recs):
                out[pos] = rec
        return out

    def stream(self, start: int, stop: int | None, cols, size: int) -> Iterator[tuple[int, list[dict]]]:
        stop = self._n if stop is None else min(stop, self._n)
        if start >= stop:
            return
        g0 = bisect.bisect_right(self._rg_starts, start) - 1
        row = self._rg_starts[g0]
        for g in range(g0, len(self._rg_index)):
            if row >= stop:
                break
            fi, rg = self._rg_index[g]
            for rb in self._pf[fi].iter_batches(batch_size=size, row_groups=[rg], columns=cols):
                lo, hi = max(start - row, 0), min(stop - row, rb.num_rows)
                if hi > lo:
                    yield row + lo, rb.slice(lo, hi - lo).to_pylist()
                row += rb.num_rows
                if row >= stop:
                    break


class _DatasetsBackend:
    """A folder written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``, with ``split``)."""

    def __init__(self, path: Path, split: str | None):
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise InputError(f"{str(path)!r} could not be loaded with datasets.load_from_disk ({e}).") from None
        if isinstance(ds, datasets.DatasetDict):
            splits = list(ds.keys())
            if split is None and len(splits) == 1:
                split = splits[0]
            if split is None or split not in ds:
                raise InputError(
                    f"{str(path)!r} is a DatasetDict with splits {splits}; choose one with split=... "
                    f"(CLI: --split){'' if split is None else f' (got {split!r})'}."
                )
            ds = ds[split]
        elif split is not None:
            raise InputError(f"{str(path)!r} is a single Dataset; it has no split {split!r}. Drop split=.")
        self.path = path
        self.ds = ds
        self.columns = list(ds.column_names)
        self._views: dict = {}
        if len(ds) == 0:
            raise InputError(f"Corpus {str(path)!r} is empty (0 rows). Point to a non-empty dataset.")

    def n_rows(self) -> int:
        return len(self.ds)

    def _view(self, cols):
        key = tuple(cols) if cols is not None else None
        if key not in self._views:
            ds = self.ds if cols is None else self.ds.select_columns(list(cols))
            self._views[key] = ds.with_format("arrow")
        return self._views[key]

    def read(self, rows: Sequence[int], cols) -> list[dict]:
        return self._view(cols)[[int(r) for r in rows]].to_pylist()

    def stream(self, start: int, stop: int | None, cols, size: int) -> Iterator[tuple[int, list[dict]]]:
        view = self._view(cols)
        stop = len(self.ds) if stop is None else min(stop, len(self.ds))
        for lo in range(start, stop, size):
            yield lo, view[lo : min(lo + size, stop)].to_pylist()


# --------------------------------------------------------------------------------------------------
# the public Corpus


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
            self._b = _JsonlBackend(self.path, cache_dir)
        elif fmt == "parquet":
            self._b = _ParquetBackend(self.path)
        elif fmt == "datasets":
            self._b = _DatasetsBackend(self.path, split)
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
        n = len(self)
        files = [self.path] if self.path.is_file() else [q for q in sorted(self.path.rglob("*")) if q.is_file()]
        size = sum(q.stat().st_size for q in files)
        mtime = max(q.stat().st_mtime_ns for q in files)
        rows = sorted(set(list(range(min(n, 8))) + list(range(max(n - 8, 0), n)) + np.linspace(0, n - 1, min(n, n_sample)).astype(int).tolist()))
        h = hashlib.sha256()
        h.update(f"{n}|{self.text_field}|{self.id_field}".encode())
        texts = self.texts(rows) if self.text_field is not None else [""] * len(rows)
        for r, d, t in zip(rows, self.doc_ids(rows), texts):
            h.update(f"\x00{r}\x00{d}\x00".encode())
            h.update(t.encode("utf-8", "surrogatepass"))
        return {
            "path": str(self.path.resolve()),
            "format": self.format,
            "split": self.split,
            "text_field": self.text_field,
            "id_field": self.id_field,
            "n_rows": n,
            "bytes": size,
            "mtime_ns": mtime,
            "sample_sha256": h.hexdigest(),
        }

    def content_sha256(self, batch_size: int = 4096) -> str:
        """A hash of every row's id and text, in order: one read pass (an index stores it, so that an
        edit anywhere in the corpus is seen, not only in :meth:`fingerprint`'s sampled rows)."""
        h = hashlib.sha256()
        h.update(f"{len(self)}|{self.text_field}|{self.id_field}".encode())
        field = self.text_field if self.text_field is not None else None
        for b in self.iter_batches(batch_size, field=field):
            for j, (d, t) in enumerate(zip(b.ids, b.texts)):
                h.update(f"\x00{b.start + j}\x00{d}\x00".encode())
                h.update(("" if t is None else str(t)).encode("utf-8", "surrogatepass"))
        return h.hexdigest()

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
        if isinstance(self._b, _JsonlBackend):
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
