"""The JSON-lines reader of :class:`msif.data.corpus.Corpus`: rows are the non-blank lines.

Streaming reads line by line; random access uses a byte-offset index (the ``(starts, ends)`` of every
non-blank line, two int64 per row), built on first use by :func:`scan_line_offsets` and cached on disk
keyed by the file's path, size and mtime.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from msif.data.encoding import InputError

_SCAN_CHUNK = 8 << 20  # bytes read at a time when building a JSONL offset index


class JsonlBackend:
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
        cached = _read_cached_offsets(paths, stamp) if paths is not None else None
        if cached is not None:
            return cached
        starts, ends = scan_line_offsets(self.path)
        if paths is not None:
            _write_cached_offsets(paths, stamp, starts, ends)
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


def _read_cached_offsets(paths: tuple[Path, Path], stamp: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached ``(starts, ends)`` when the cache's stamp equals ``stamp`` (same file, size, mtime), else None."""
    npy, meta = paths
    try:
        if json.loads(meta.read_text()) == stamp:
            both = np.load(npy, mmap_mode="r")
            if both.ndim == 2 and both.shape[0] == 2:
                return both[0], both[1]
    except (OSError, ValueError):
        pass
    return None


def _write_cached_offsets(paths: tuple[Path, Path], stamp: dict, starts: np.ndarray, ends: np.ndarray) -> None:
    """Write the offsets, then their stamp, each by an atomic rename."""
    npy, meta = paths
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


_WS = np.zeros(256, dtype=bool)
_WS[[9, 10, 11, 12, 13, 32]] = True


def scan_line_offsets(path: Path) -> tuple[np.ndarray, np.ndarray]:
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
