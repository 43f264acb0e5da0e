"""One way the studies time their stages: ``with timings("stage"): ...`` adds the seconds to ``timings["stage"]``."""

from __future__ import annotations

import time
from contextlib import contextmanager


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
