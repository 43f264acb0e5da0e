"""Kronecker diagnostics: how far a Kronecker eigenbasis ``Q_S ⊗ Q_A`` is from diagonalising an exact GGN block.

EK-FAC inverts a block exactly only if its Kronecker eigenbasis diagonalises the block (docs/method.md
§2). For exact blocks ``G_b`` (row-major vec of an ``(o, n)`` weight block, in ``layout.blocks`` order):
the exact ``Λ = diag((Q_S ⊗ Q_A)ᵀ G_b (Q_S ⊗ Q_A))`` that EK-FAC estimates by sampling labels, the
share of ``‖G_b‖²_F`` off that diagonal, the nearest single Kronecker product's eigenbasis
(Van Loan–Pitsianis) and its preconditioner.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..curvature.factors import FactorSet

__all__ = [
    "exact_lambdas", "lambda_rel_error", "offdiagonal_share", "rotated_diagonal", "offdiagonal_mass",
    "nearest_kronecker_basis", "nearest_kronecker_bases", "kronecker_precondition", "fitted_bases",
    "kronecker_summary",
]


def _kron(fs: FactorSet, block: str) -> torch.Tensor:
    """``Q_S ⊗ Q_A`` of a fitted block (row-major vec of its ``(out_b, in_dim)`` matrix)."""
    return torch.kron(fs.QS[block], fs.QA[fs.blocks[block].module])


def exact_lambdas(fs: FactorSet, blk_G: list[torch.Tensor], layout) -> dict[str, torch.Tensor]:
    """Per block, ``diag((Q_S ⊗ Q_A)ᵀ G_b (Q_S ⊗ Q_A))`` ``(out_b, in_dim)`` in ``fs``'s fitted eigenbasis:
    the exact value of the eigenvalue correction ``Λ`` that EK-FAC estimates by sampling labels."""
    out = {}
    for b, Gb in zip(layout.blocks, blk_G):
        K = _kron(fs, b)
        out[b] = torch.einsum("ij,ik,kj->j", K, Gb, K).reshape(fs.blocks[b].out_dim, -1)
    return out


def lambda_rel_error(fs: FactorSet, lam_exact: dict[str, torch.Tensor]) -> float:
    """``‖Λ_fit − Λ_exact‖_F / ‖Λ_exact‖_F`` over all blocks of ``lam_exact`` (:func:`exact_lambdas`).
    Sampling noise shrinks like ``1/√(R·N)``; a bias would not."""
    num = den = 0.0
    for b, le in lam_exact.items():
        num += float(((fs.lambdas(b) - le) ** 2).sum())
        den += float((le**2).sum())
    return math.sqrt(num / den)


def offdiagonal_share(fs: FactorSet, blk_G: list[torch.Tensor], layout) -> tuple[float, dict[str, float]]:
    """Share of ``‖G_b‖²_F`` off the diagonal of the fitted eigenbasis ``Q_S ⊗ Q_A``, summed over blocks:
    the part no choice of ``Λ`` can represent. Overall and per module."""
    on, tot = {}, {}
    for b, Gb in zip(layout.blocks, blk_G):
        m = fs.blocks[b].module
        K = _kron(fs, b)
        R = K.T @ Gb @ K
        tot[m] = tot.get(m, 0.0) + float((R**2).sum())
        on[m] = on.get(m, 0.0) + float((torch.diagonal(R) ** 2).sum())
    return 1.0 - sum(on.values()) / sum(tot.values()), {m: 1.0 - on[m] / tot[m] for m in tot}


def rotated_diagonal(Gb: torch.Tensor, QS: torch.Tensor, QA: torch.Tensor) -> torch.Tensor:
    """``diag((Q_S ⊗ Q_A)ᵀ Gb (Q_S ⊗ Q_A))`` as ``(o, n)``, without forming the Kronecker product."""
    o, n = QS.shape[0], QA.shape[0]
    Y = torch.einsum("ijkl,ip,kp->pjl", Gb.reshape(o, n, o, n), QS, QS)
    return torch.einsum("pjl,jq,lq->pq", Y, QA, QA)


def offdiagonal_mass(Gb: torch.Tensor, QS: torch.Tensor, QA: torch.Tensor) -> float:
    """Share of ``‖Gb‖²_F`` off the diagonal in the basis ``Q_S ⊗ Q_A`` (0: the basis diagonalises it)."""
    d = rotated_diagonal(Gb, QS, QA)
    return max(0.0, 1.0 - float((d * d).sum() / (Gb * Gb).sum()))


def nearest_kronecker_basis(Gb: torch.Tensor, o: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The eigenbases ``(Q_S, Q_A)`` of the Kronecker product ``S ⊗ A`` nearest to the block ``Gb``
    (``(o·n, o·n)``, row-major vec of an ``(o, n)`` weight block) in Frobenius norm, and the exact
    ``Λ (o, n)``: the diagonal of ``Gb`` in that basis.

    Van Loan and Pitsianis: the nearest ``S ⊗ A`` is the top singular pair of the rearranged block
    ``R[(i,k),(j,l)] = Gb[(i,j),(k,l)]``. With the exact Λ this is the best any single-Kronecker
    eigenbasis method (K-FAC, EK-FAC, refined EK-FAC) can do per block: a diagnostic ceiling below the
    exact block-diagonal one."""
    T = Gb.reshape(o, n, o, n)
    U, _, Vh = torch.linalg.svd(T.permute(0, 2, 1, 3).reshape(o * o, n * n), full_matrices=False)
    S, A = U[:, 0].reshape(o, o), Vh[0].reshape(n, n)
    QS = torch.linalg.eigh(0.5 * (S + S.T)).eigenvectors
    QA = torch.linalg.eigh(0.5 * (A + A.T)).eigenvectors
    return QS, QA, rotated_diagonal(Gb, QS, QA)


def nearest_kronecker_bases(blk_G: list[torch.Tensor], fs: FactorSet, layout) -> list:
    """:func:`nearest_kronecker_basis` of every exact block in ``layout`` order (shapes from ``fs``'s blocks)."""
    return [nearest_kronecker_basis(Gb, fs.blocks[b].out_dim, fs.modules[fs.blocks[b].module].in_dim)
            for Gb, b in zip(blk_G, layout.blocks)]


def kronecker_precondition(bases: list, ranges: list[tuple[int, int]], V: torch.Tensor, lam: float) -> torch.Tensor:
    """``(D, k)`` ↦ per block ``(Q_S ⊗ Q_A) diag(Λ + λ)⁻¹ (Q_S ⊗ Q_A)ᵀ v`` for ``bases[b] = (Q_S, Q_A, Λ)``."""
    out = torch.zeros_like(V)
    for (QS, QA, L), (s, e) in zip(bases, ranges):
        o, n = QS.shape[0], QA.shape[0]
        X = V[s:e].T.reshape(-1, o, n)
        out[s:e] = (QS @ ((QS.T @ X @ QA) / (L + lam)) @ QA.T).reshape(-1, o * n).T
    return out


def fitted_bases(fs: FactorSet, layout) -> tuple[list, list[tuple[int, int]]]:
    """The fitted factors' per-block ``(Q_S, Q_A)`` in ``layout`` order, and the blocks' ranges."""
    bases, ranges = [], []
    for b, rng in layout.blocks.items():
        blk = fs.blocks[b]
        bases.append((fs.QS[b], fs.QA[blk.module]))
        ranges.append(rng)
    return bases, ranges


def kronecker_summary(blk_G: list[torch.Tensor], kron_best: list, fits: dict[str, FactorSet], layout) -> dict:
    """Mean over blocks of the off-diagonal share of each exact block in each basis."""
    out = {"best": float(np.mean([offdiagonal_mass(Gb, QS, QA) for Gb, (QS, QA, _) in zip(blk_G, kron_best)]))}
    for name, fs in fits.items():
        bases, _ = fitted_bases(fs, layout)
        out[name] = float(np.mean([offdiagonal_mass(Gb, QS, QA) for Gb, (QS, QA) in zip(blk_G, bases)]))
    return {"offdiagonal_mass": out}
