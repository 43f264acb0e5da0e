"""Damping ``λ`` of ``(G + λI)⁻¹``: the one type every command, benchmark and factor set uses.

A damping is absolute (``1e-4``) or relative to a factor set's mean eigenvalue ``mean(Λ)`` over all
blocks (``"0.1x"``, also written ``"rel:0.1"``), so that one setting means the same amount of
regularisation for models whose curvature differs by orders of magnitude (docs/method.md §2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Damping:
    """``value`` (finite, ≥ 0) and whether it multiplies the mean eigenvalue (``relative``)."""

    value: float
    relative: bool = False

    @staticmethod
    def parse(x: "float | str | Damping") -> "Damping":
        """``0.01`` → absolute; ``"0.1x"`` or ``"rel:0.1"`` → relative to the mean eigenvalue.
        Raises ValueError for anything else, and for NaN, infinite or negative values."""
        if isinstance(x, Damping):
            return x
        if isinstance(x, str):
            s = x.strip().lower()
            if s.endswith("x"):
                return Damping(float(s[:-1]), True)
            if s.startswith("rel:"):
                return Damping(float(s[4:]), True)
            return Damping(float(s), False)
        return Damping(float(x), False)

    def __post_init__(self):
        if not (self.value >= 0) or math.isinf(self.value):
            raise ValueError(f"damping must be a finite number ≥ 0, not {self.value}")

    def absolute(self, mean_eigenvalue: float) -> float:
        """``λ`` for a factor set whose mean eigenvalue is ``mean_eigenvalue``."""
        return self.value * mean_eigenvalue if self.relative else self.value

    def to_json(self) -> "float | str":
        """As written in results: the float ``λ``, or ``"0.1x"`` for a relative damping."""
        return f"{self.value:g}x" if self.relative else self.value

    def __str__(self) -> str:
        return f"{self.value:g}x" if self.relative else f"{self.value:g}"
