"""The columnar readers of :class:`msif.data.corpus.Corpus`: Parquet files and ``datasets`` folders.

Each reader exposes ``columns``, ``n_rows()``, ``read(rows, cols)`` (dicts in the order of ``rows``) and
``stream(start, stop, cols, size)`` (yields ``(first_row, list_of_dicts)``), like
:class:`msif.data.jsonl.JsonlBackend`.
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any, Iterator, Sequence

from msif.data.encoding import InputError
from msif.data.formats import parquet_files


class ParquetBackend:
    """One Parquet file or a folder of them; rows are numbered across files in sorted path order."""

    def __init__(self, path: Path):
        import pyarrow.parquet as pq

        self.path = path
        self.files = parquet_files(path) if path.is_dir() else [path]
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


class DatasetsBackend:
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
