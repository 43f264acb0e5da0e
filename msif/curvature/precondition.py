"""Damped inverse-GGN products, chained over stages: ``P_k ⋯ P_1 g`` for query gradients ``g``.

One stage is a :class:`~msif.curvature.factors.FactorSet` with an absolute damping ``λ``; per block
``P V = Q_S [(Q_Sᵀ V Q_A) ⊙ W] Q_Aᵀ`` with ``W = 1/(Λ + λ)``. Chaining (MS-IF:
``U = P_pt P_ft ∇m``) never returns to the parameter basis between stages: the change of basis
``Q_S²ᵀ Q_S¹ · X · Q_A¹ᵀ Q_A²`` is applied through ``R_S = Q_S²ᵀ Q_S¹`` and ``R_A = Q_A¹ᵀ Q_A²``,
formed once per module, when that is cheaper than two separate rotations for the queries at hand.

Query gradients of a module can come factored, ``DW_q = s_qᵀ a_q`` (:class:`Factored`, ``T`` tokens):
the first rotation is then ``(s_q Q_S)ᵀ (a_q Q_A)`` — ``T·(out² + in² + out·in)`` multiply-adds
instead of ``out·in·(T + out + in)`` — chosen per module by its cost.

Multiply-adds per query and module (``o_b`` rows of block ``b``, ``i`` input columns): a rotation
``Σ_b o_b²·i + o·i²``; MS-IF with factored gradients: the first rotation as above, one change of
basis (a rotation, plus ``(Σ_b o_b³ + i³)/Q`` for ``R``), one rotation back. Diagonal stages live in
the parameter basis and identity stages are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class Factored:
    """Per-example gradients of one module as ``DW_q = s_qᵀ a_q``: ``s (Q, T, out)``, ``a (Q, T, in_dim)``."""

    s: torch.Tensor
    a: torch.Tensor

    def dense(self, dtype=None) -> torch.Tensor:
        """``(Q, out, in_dim)``."""
        s, a = (self.s, self.a) if dtype is None else (self.s.to(dtype), self.a.to(dtype))
        return torch.bmm(s.transpose(1, 2), a)

    @property
    def n(self) -> int:
        return self.s.shape[0]

    def worth_it(self) -> bool:
        """Whether the factors are smaller than the dense gradients (``T·(out + in_dim) < out·in_dim``)."""
        T, o, i = self.s.shape[1], self.s.shape[2], self.a.shape[2]
        return T * (o + i) < o * i

    @staticmethod
    def cat(parts: Sequence["Factored"]) -> "Factored":
        """Examples of several batches in one, zero-padded to the longest (zero rows add nothing)."""
        T = max(p.s.shape[1] for p in parts)
        pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, T - x.shape[1]))  # noqa: E731
        return Factored(torch.cat([pad(p.s) for p in parts]), torch.cat([pad(p.a) for p in parts]))


class _Stage:
    """One factor set at one damping, for one module: its basis (``None``: the parameter basis) and
    the damped inverse eigenvalues of each block, formed once."""

    def __init__(self, fs, lam: float, module: str, dtype, device):
        self.fs, self.tm = fs, fs.modules[module]
        self.rotated = fs.strategy in ("ekfac", "kfac")
        self.QA = fs.QA[module].to(device=device, dtype=dtype) if self.rotated else None
        self.QS = [fs.QS[b.name].to(device=device, dtype=dtype) for b in self.tm.blocks] if self.rotated else None
        self.W = [fs.inverse_eigenvalues(b.name, lam, dtype).to(device) for b in self.tm.blocks]


def _rotation_cost(tm) -> int:
    """Multiply-adds of ``Q_Sᵀ X Q_A`` for one query of module ``tm``."""
    return sum(b.out_dim ** 2 for b in tm.blocks) * tm.in_dim + tm.out_features * tm.in_dim ** 2


def _basis_change_cost(tm) -> int:
    """Multiply-adds of forming ``R_S`` (every block) and ``R_A``."""
    return sum(b.out_dim ** 3 for b in tm.blocks) + tm.in_dim ** 3


def _factored_cheaper(tm, T: int) -> bool:
    """Whether rotating ``T``-token factors beats forming the gradient and rotating it."""
    factored = T * (sum(b.out_dim ** 2 for b in tm.blocks) + tm.in_dim ** 2 + tm.out_features * tm.in_dim)
    return factored < T * tm.out_features * tm.in_dim + _rotation_cost(tm)


def _enter(stage: _Stage, g, dtype) -> torch.Tensor:
    """``Q_Sᵀ DW Q_A`` per block (or ``DW`` itself in the parameter basis), ``(Q, out, in_dim)``."""
    tm = stage.tm
    if isinstance(g, Factored):
        if stage.rotated and _factored_cheaper(tm, g.s.shape[1]):
            s, aQ = g.s.to(dtype), g.a.to(dtype) @ stage.QA
            X = torch.empty(g.n, tm.out_features, tm.in_dim, dtype=dtype, device=aQ.device)
            for blk, QS in zip(tm.blocks, stage.QS):
                X[:, blk.rows] = torch.bmm((s[..., blk.rows] @ QS).transpose(1, 2), aQ)
            return X
        g = g.dense(dtype)
    g = g.to(dtype)
    return _rotate(g, stage.QS, stage.QA, tm, transpose=True) if stage.rotated else g.clone()


def _rotate(X: torch.Tensor, QS, QA, tm, transpose: bool) -> torch.Tensor:
    """``Q_Sᵀ X Q_A`` (``transpose``) or ``Q_S X Q_Aᵀ`` per block, a new tensor."""
    Y = X @ (QA if transpose else QA.T)
    if len(QS) == 1:
        return (QS[0].T if transpose else QS[0]) @ Y
    for blk, S in zip(tm.blocks, QS):
        Y[:, blk.rows] = (S.T if transpose else S) @ Y[:, blk.rows]
    return Y


def _change_basis(X: torch.Tensor, a: _Stage, b: _Stage, tm) -> torch.Tensor:
    """``X`` from stage ``a``'s basis to stage ``b``'s (fused through ``R_S``, ``R_A`` when cheaper)."""
    if not a.rotated:
        return _rotate(X, b.QS, b.QA, tm, transpose=True) if b.rotated else X
    if not b.rotated:
        return _rotate(X, a.QS, a.QA, tm, transpose=False)
    if _basis_change_cost(tm) < X.shape[0] * _rotation_cost(tm):
        RS = [Sb.T @ Sa for Sa, Sb in zip(a.QS, b.QS)]  # X ↦ R_S X R_Aᵀ with R_A = Q_A²ᵀ Q_A¹
        return _rotate(X, RS, b.QA.T @ a.QA, tm, transpose=False)
    return _rotate(_rotate(X, a.QS, a.QA, tm, transpose=False), b.QS, b.QA, tm, transpose=True)


def chain(stages: Sequence[tuple], grads: dict, dtype: torch.dtype | None = None, device=None) -> dict[str, torch.Tensor]:
    """``P_k ⋯ P_1 g`` per module: ``stages`` = ``[(FactorSet, damping), …]`` in the order applied
    (MS-IF: ``[(ft, λ_ft), (pt, λ_pt)]``); ``grads`` module → ``(Q, out, in_dim)`` tensor or
    :class:`Factored`. Returns new ``(Q, out, in_dim)`` tensors in ``dtype`` (default: the first
    stage's factors' dtype) on ``device`` (default: the first stage's factors' device). Dampings may
    be relative (``"0.1x"``); they are resolved once here. Every stage must hold factors for every
    module of ``grads``, split into the same blocks.
    """
    from .factor_io import FactorError

    stages = [(fs, fs.resolve_damping(d)) for fs, d in stages]
    stages = [(fs, lam) for fs, lam in stages if fs.strategy != "identity"] or stages[:1]
    fs0 = stages[0][0]
    dt, dev = dtype or fs0.dtype, device or fs0.device
    out = {}
    for m, g in grads.items():
        for fs, _ in stages:
            if m not in fs.modules:
                raise FactorError(f"no factors for module {m!r}; fitted modules: {', '.join(fs.modules)}")
            if [b.out_dim for b in fs.modules[m].blocks] != [b.out_dim for b in fs0.modules[m].blocks]:
                raise FactorError(f"module {m!r} is split into different blocks in the factor sets (fit them with the same --per-head setting)")
        lead = None
        if isinstance(g, Factored):
            g = Factored(g.s.to(dev), g.a.to(dev))
        else:
            lead, g = g.shape[:-2], g.to(dev).reshape(-1, *g.shape[-2:])
        if fs0.strategy == "identity":
            u = (g.dense(dt) if isinstance(g, Factored) else g.to(dt)).clone()
        else:
            u = _chain_module([_Stage(fs, lam, m, dt, dev) for fs, lam in stages], g, dt)
        out[m] = u if lead is None else u.reshape(*lead, *u.shape[-2:])
    return out


def _chain_module(stages: list[_Stage], g, dtype) -> torch.Tensor:
    tm = stages[0].tm
    X = _enter(stages[0], g, dtype)
    prev = None
    for st in stages:
        if prev is not None:
            X = _change_basis(X, prev, st, tm)
        for blk, W in zip(tm.blocks, st.W):
            X[:, blk.rows] *= W
        prev = st
    return _rotate(X, prev.QS, prev.QA, tm, transpose=False) if prev.rotated else X
