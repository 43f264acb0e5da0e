"""Expected failures as one ``error:`` line and exit code 2; anything else is a bug, with its traceback."""

from __future__ import annotations

import errno
import os

import click
import typer

from .app import console


def _fail(msg: str, code: int = 2):
    from ..distributed import world

    w = world()
    who = "" if not w.active or msg.startswith(w.tag()) else f"{w.tag()}: "
    console.print(f"[bold red]error:[/] {who}{msg}")
    raise typer.Exit(code)


#: A write that failed for lack of room (disk full, quota, file-size limit) or of permission: the user's
#: to fix, and every msif output is written atomically, so the previous result is still in place.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EROFS}


def _write_error(e: OSError) -> str:
    where = f" ({e.filename})" if e.filename else ""
    if e.errno in (errno.EACCES, errno.EROFS):
        return (f"cannot write{where}: {os.strerror(e.errno).lower()}; choose an output you may write to. "
                "Nothing was replaced and nothing partial was left.")
    return (f"the output could not be written{where}: {os.strerror(e.errno).lower()} (the disk, a quota or a file-size "
            "limit is full); free space or write elsewhere, then rerun. Any previous result was kept and nothing "
            "partial was left.")


def user_errors(fn):
    """Turn the library's input errors into one clear line and exit code 2 (no traceback)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **k):
        from ..errors import MsifError

        try:
            return fn(*a, **k)
        except (MsifError, FileNotFoundError, FloatingPointError) as e:  # every failure msif expects
            _fail(str(e))
        except OSError as e:
            if e.errno not in _WRITE_ERRNOS:
                raise
            _fail(_write_error(e))
        except (typer.Exit, typer.Abort, click.exceptions.ClickException):
            raise
        except Exception:  # not an input msif expects: a bug, with its traceback
            console.print("[bold red]msif hit an unexpected error: this is a bug; please report it with the command "
                          "line and the traceback below[/]")
            raise

    return wrapper
