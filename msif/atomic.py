"""Atomic file writes: a temporary file in the target's folder, then ``os.replace``.

A killed run leaves either the previous file or the new one, never half of one, and no temporary.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], object]) -> Path:
    """``writer(tmp)`` writes the file at ``tmp`` (same folder, same suffix); then ``tmp`` replaces ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        writer(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
