"""Linear CKA between gradients: the gradient-similarity baseline of the paper's Table 1.

Kornblith et al. (2019) define linear centered kernel alignment between two representations of the
same ``n`` items, ``X (n, p)`` and ``Y (n, q)``, as

    CKA(X, Y) = ‖Ỹᵀ X̃‖²_F / (‖X̃ᵀ X̃‖_F ‖Ỹᵀ Ỹ‖_F),      X̃ = H X, Ỹ = H Y,  H = I − 11ᵀ/n

(columns centred over the ``n`` items); equivalently ``⟨K̃_X, K̃_Y⟩_F / (‖K̃_X‖_F ‖K̃_Y‖_F)`` with the
centred Gram matrices ``K̃_X = X̃ X̃ᵀ`` ``(n, n)``. It lies in ``[0, 1]``, is invariant to orthogonal
transforms and isotropic scaling of either side, and is 1 for identical representations.

The paper applies CKA "on query and training gradients" without more detail. What msif implements:
for one tracked linear layer the per-example gradient ``DW (out, in_dim)`` is read as a representation
of the layer's ``out`` output units (the items, rows) by ``in_dim`` input features (columns); the
score of a candidate ``z`` for a query ``q`` is the **mean over tracked layers** of
``CKA(DW_q, DW_z)``. Being scale- and sign-invariant, it measures how alike the two gradients'
shapes are, not the direction or size of the influence (it is never negative).
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["linear_cka", "centered_gram_features", "gradient_cka"]


def linear_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Linear CKA of two representations ``X (n, p)`` and ``Y (n, q)`` of the same ``n`` items (float64).

    Returns 0 when either side is constant over the items (zero centred Gram matrix).
    """
    if X.dim() != 2 or Y.dim() != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"expected (n, p) and (n, q) matrices with the same n, got {tuple(X.shape)}, {tuple(Y.shape)}")
    X = X.double() - X.double().mean(0, keepdim=True)
    Y = Y.double() - Y.double().mean(0, keepdim=True)
    num = float((Y.T @ X).pow(2).sum())
    den = float((X.T @ X).norm() * (Y.T @ Y).norm())
    return num / den if den > 0 else 0.0


def centered_gram_features(G: torch.Tensor) -> torch.Tensor:
    """``G (B, n, p)`` → ``(B, n·n)``: each example's centred Gram ``X̃ X̃ᵀ`` flattened and normalised
    to unit Frobenius norm (zero rows stay zero), so that ``CKA(X_a, X_b) = f_a · f_b``."""
    G = G.double()
    Xc = G - G.mean(-2, keepdim=True)
    K = Xc @ Xc.transpose(-1, -2)  # (B, n, n)
    f = K.reshape(K.shape[0], -1)
    nrm = f.norm(dim=1, keepdim=True)
    return f / torch.where(nrm > 0, nrm, torch.ones_like(nrm))


def gradient_cka(
    query_grads: dict[str, torch.Tensor],
    candidate_grads: dict[str, torch.Tensor],
    modules: Sequence[str] | None = None,
) -> torch.Tensor:
    """CKA scores ``(Q, C)``: mean over the tracked layers of ``CKA(DW_q, DW_z)``.

    ``query_grads`` / ``candidate_grads`` map layer name → per-example gradients ``(Q, out, in_dim)`` /
    ``(C, out, in_dim)`` (e.g. from :func:`msif.curvature.hooks.per_example_grads`). ``modules`` selects
    the layers (default: all those in ``query_grads``).
    """
    names = list(query_grads) if modules is None else list(modules)
    if not names:
        raise ValueError("no layer to compare")
    total = None
    for n in names:
        if n not in candidate_grads:
            raise KeyError(f"layer {n!r} has query gradients but no candidate gradients")
        s = centered_gram_features(query_grads[n]) @ centered_gram_features(candidate_grads[n]).T
        total = s if total is None else total + s
    return total / len(names)
