"""Which reader a corpus path needs: JSON lines, Parquet, or a ``datasets`` save_to_disk folder."""

from __future__ import annotations

import os
from pathlib import Path

from msif.data.encoding import InputError

SUPPORTED_FORMATS = (
    "JSON lines (.jsonl, .ndjson, or .json with one object per line), Parquet (.parquet/.pq, or a "
    "folder of .parquet files), or a folder written by datasets' save_to_disk"
)
_JSONL_EXT = (".jsonl", ".ndjson", ".json")
_PARQUET_EXT = (".parquet", ".pq")


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
        if parquet_files(p):
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


def parquet_files(folder: Path) -> list[Path]:
    return sorted(q for q in folder.rglob("*") if q.is_file() and q.name.lower().endswith(_PARQUET_EXT))
