"""The flat parameter vector of the tracked modules, and the one converter between it and per-module matrices.

Layout (used throughout msif)
-----------------------------
``θ`` is the concatenation, over the tracked modules in :func:`~msif.models.adapters.tracked_modules`
order, of each module's effective matrix ``W_eff = [W | b]`` (shape ``(out, in_dim)``, the bias as
the last column; HF ``Conv1D`` weights are transposed first) flattened **row-major**. A block of rows
``[r0, r1)`` of a module at offset ``o`` is the contiguous index range ``[o + r0*in_dim, o + r1*in_dim)``.

Several vectors at once are held either as rows, ``(k, D)`` ↔ ``{module: (k, out, in_dim)}``
(:func:`to_modules` / :func:`from_modules`, the layout of query gradients), or as columns,
``(D, k)`` ↔ ``{module: (out, in_dim, k)}`` (:func:`unflatten` / :func:`flatten`, the same walk with
the vector axis last).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from ..models.adapters import TrackedModule

__all__ = ["Layout", "param_layout", "to_modules", "from_modules", "flatten", "unflatten"]


class Layout(NamedTuple):
    """Where each tracked module and block lives in the flat parameter vector.

    ``offsets``: module name → start index of its flattened ``W_eff`` (dict in module order);
    ``blocks``: block name → ``(start, stop)`` index range; ``D``: total number of parameters.
    Unpacks as ``offsets, blocks, D``; :attr:`modules` gives each module's ``(start, stop)``.
    """

    offsets: dict[str, int]
    blocks: dict[str, tuple[int, int]]
    D: int

    @property
    def modules(self) -> dict[str, tuple[int, int]]:
        """Module name → ``(start, stop)`` of the whole module (modules are contiguous, in order)."""
        return module_ranges(self.offsets, self.D)


def module_ranges(offsets: dict, D: int) -> dict:
    """Module name → ``(start, stop)`` from the modules' offsets and the total size ``D``."""
    names = sorted(offsets, key=offsets.get)
    stops = [offsets[n] for n in names[1:]] + [D]
    return {n: (offsets[n], e) for n, e in zip(names, stops)}


def param_layout(tms: Sequence[TrackedModule]) -> Layout:
    """Offsets and index ranges of the tracked modules and blocks (see the module docstring).

    Returns a :class:`Layout` ``(offsets, blocks, D)``: ``offsets[module] = o``,
    ``blocks[block] = (o + row_start*in_dim, o + row_stop*in_dim)``, ``D = Σ out*in_dim``.
    """
    offsets: dict[str, int] = {}
    blocks: dict[str, tuple[int, int]] = {}
    o = 0
    for tm in tms:
        if tm.name in offsets:
            raise ValueError(f"module {tm.name!r} is tracked twice")
        offsets[tm.name] = o
        for b in tm.blocks:
            if b.name in blocks:
                raise ValueError(f"block name {b.name!r} is used twice")
            blocks[b.name] = (o + b.row_start * tm.in_dim, o + b.row_stop * tm.in_dim)
        o += tm.out_features * tm.in_dim
    return Layout(offsets, blocks, o)


def to_modules(flat: torch.Tensor, tms: Sequence[TrackedModule]) -> dict[str, torch.Tensor]:
    """``(..., D)`` → ``{name: (..., out, in_dim)}`` views, in module order."""
    out, o = {}, 0
    for tm in tms:
        n = tm.out_features * tm.in_dim
        out[tm.name] = flat[..., o : o + n].reshape(*flat.shape[:-1], tm.out_features, tm.in_dim)
        o += n
    if o != flat.shape[-1]:
        raise ValueError(f"vector has {flat.shape[-1]} entries, the tracked modules have {o}")
    return out


def from_modules(mats: dict[str, torch.Tensor], tms: Sequence[TrackedModule]) -> torch.Tensor:
    """Inverse of :func:`to_modules`: ``{name: (..., out, in_dim)}`` → a new ``(..., D)`` tensor."""
    parts = []
    for tm in tms:
        m = mats[tm.name]
        if tuple(m.shape[-2:]) != (tm.out_features, tm.in_dim):
            raise ValueError(f"{tm.name}: expected shape (..., {tm.out_features}, {tm.in_dim}), got {tuple(m.shape)}")
        parts.append(m.reshape(*m.shape[:-2], tm.out_features * tm.in_dim))
    return torch.cat(parts, dim=-1)


def flatten(mats: dict[str, torch.Tensor], tms: Sequence[TrackedModule]) -> torch.Tensor:
    """:func:`from_modules` with the vector axis last: ``{name: (out, in_dim)}`` → ``(D,)``, or
    ``{name: (out, in_dim, k)}`` → ``(D, k)`` (contiguous)."""
    if all(mats[tm.name].dim() == 2 for tm in tms):
        return from_modules(mats, tms)
    cols = from_modules({tm.name: mats[tm.name].movedim(-1, 0) for tm in tms}, tms)  # (k, D)
    return cols.T.contiguous()


def unflatten(vec: torch.Tensor, tms: Sequence[TrackedModule]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten`: ``(D,)`` (or ``(D, k)``) → ``{name: (out, in_dim)}`` (or ``(out, in_dim, k)``) views."""
    if vec.dim() == 1:
        return to_modules(vec, tms)
    return {n: m.movedim(0, -1) for n, m in to_modules(vec.T, tms).items()}
