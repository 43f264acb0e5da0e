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


def atomic_dir(path: str | os.PathLike, writer: Callable[[Path], object]) -> Path:
    """``writer(tmp)`` fills a fresh folder beside ``path``; then it replaces ``path`` as a whole.

    A killed run leaves the previous folder or the new one, never a mix (at worst a hidden
    ``.NAME.tmp-*`` / ``.NAME.old-*`` folder beside it).
    """
    import shutil
    import tempfile

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        writer(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
