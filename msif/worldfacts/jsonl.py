"""JSON-lines files of the world: one dict per line, UTF-8."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: str | Path, rows) -> None:
    """Write dicts one per line (UTF-8, keys in insertion order)."""
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
