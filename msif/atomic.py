"""Atomic file writes: a temporary file in the target's folder, then ``os.replace``.

A killed run leaves either the previous file or the new one, never half of one, and no temporary.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], object]) -> Path:
    """``writer(tmp)`` writes the file at ``tmp`` (same folder, same suffix); then ``tmp`` replaces ``path``.

    ``tmp`` is ``.NAME.tmp-PID.SUFFIX``: the leftover of a killed writer is what :class:`OutputLock`
    sweeps for ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
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
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the final folder gets the user's umask like any mkdir
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


def _umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def prepare_out_dir(out_dir: str | os.PathLike, overwrite: bool, what: str, marker: str, flag: str = "--overwrite") -> None:
    """Refuse to clobber ``out_dir`` before any work is done: a file, a non-empty folder that is not
    one of ours (no ``marker`` file in it: a model checkpoint, unrelated files), or one of ours
    without ``overwrite``. Raises :class:`msif.data.encoding.InputError` naming the fix."""
    from .data.encoding import InputError

    out = Path(out_dir)
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"{str(out)!r} exists and is a file; choose another output folder.")
    if not any(out.iterdir()):
        return
    if not (out / marker).is_file():
        raise InputError(f"{str(out)!r} exists, is not empty and is not an msif {what} folder; refusing to overwrite it. "
                         "Choose another output folder.")
    if not overwrite:
        raise InputError(f"{what.capitalize()} {str(out)!r} already exists. Pass {flag} to replace it, or choose another output folder.")


class OutputLock:
    """Exclusive use of an output folder by one process: ``.NAME.lock`` beside it, ``flock``-ed.

    A second process asking for the same folder gets one line instead of a silent race (two fits
    into one folder, the last one winning). While held, the hidden ``.NAME.tmp-*`` / ``.NAME.old-*``
    leftovers of a killed earlier write into that folder are removed (nobody else can be writing
    them). The lock file is removed on release.
    """

    def __init__(self, out_dir: str | os.PathLike, what: str = "msif"):
        self.out = Path(out_dir)
        self.path = self.out.with_name(f".{self.out.name}.lock")
        self.what = what
        self.fd = None

    def __enter__(self) -> "OutputLock":
        import fcntl

        from .data.encoding import InputError

        self.out.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise InputError(f"another {self.what} process is writing {str(self.out)!r} (lock {self.path.name}); "
                                 "wait for it or choose another output folder") from None
            try:  # the file may have been unlinked by its last holder between open and flock: retry on a fresh one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        self._sweep()
        return self

    def _sweep(self) -> None:
        import shutil

        for p in self.out.parent.glob(f".{self.out.name}.tmp-*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        for p in self.out.parent.glob(f".{self.out.name}.old-*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def __exit__(self, *exc) -> None:
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None
