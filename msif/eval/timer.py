"""The studies' one stopwatch: ``with Timer() as t: ...`` then ``t.s`` seconds (the time so far inside);
:class:`Timings` adds such times up per named stage (``with timings("stage"): ...``)."""

from __future__ import annotations

import time
from contextlib import contextmanager


class Timer:
    """Wall-clock seconds of a ``with`` block: :attr:`s` is the elapsed time, frozen when the block ends."""

    def __enter__(self) -> "Timer":
        self.start, self.end = time.perf_counter(), None
        return self

    def __exit__(self, *exc) -> None:
        self.end = time.perf_counter()

    @property
    def s(self) -> float:
        return (self.end if self.end is not None else time.perf_counter()) - self.start


class Timings(dict):
    """Seconds per named stage (a stage timed twice adds up); a plain dict, JSON-ready."""

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - t0

    def rounded(self, digits: int = 2) -> dict[str, float]:
        return {k: round(v, digits) for k, v in self.items()}
