"""The ``msif`` command line: one entry point for the whole pipeline.

One module per group of commands: :mod:`.fit` (fit, index), :mod:`.attribute`, :mod:`.tools` (demo,
proximity, plan) and :mod:`.bench`; :mod:`.app` holds the application and the shared option types,
:mod:`.failures` turns expected failures into one line.
"""

from __future__ import annotations

from . import attribute, bench, fit, tools  # noqa: F401  (importing a module registers its commands)
from .app import app, bench_app, console
from .failures import user_errors

app.add_typer(bench_app, name="bench")

__all__ = ["app", "console", "main", "user_errors"]


def main():
    from ..distributed import broken, exit_now, shutdown

    ok = False
    try:
        app()
    except SystemExit as e:
        if broken():  # a collective failed (its message is printed): leave without the group's destructors
            exit_now(e.code if isinstance(e.code, int) and e.code else 1)
        ok = e.code in (None, 0)
        raise
    finally:
        shutdown(success=ok)

