"""TRAK (Park et al., ICML 2023): attribution with random projections and an ensemble of models.

What msif implements (and what it leaves out)
---------------------------------------------
For each model ``m`` of an ensemble (in the paper's scalability study: models trained on random
halves of the training data; any list of models sharing one architecture works):

1. **Model output function.** For a language-model sequence ``z`` with counted next-token predictions
   ``t`` and correct-token probabilities ``p_t``, the output is the summed per-token margin
   ``f(z) = Σ_t log(p_t / (1 − p_t))`` — TRAK's multi-class margin applied per token. Its link to the
   loss is exact per token: ``ℓ_t = −log p_t = log(1 + e^{−f_t})``, so ``∂ℓ_t/∂f_t = −(1 − p_t)``.
2. **Features.** ``φ_m(z) = Pᵀ ∇θ f(z) / √k``: the gradient of ``f`` with respect to the tracked linear
   weights (the same parameters every msif method analyses), projected by a random ``(D, k)`` matrix
   ``P`` with i.i.d. standard Gaussian or Rademacher (±1) entries (:class:`Projector`; the ``1/√k``
   makes inner products unbiased). ``Φ_m (N, k)`` stacks the features of **all** ``N`` training
   examples (the kernel's data), ``φ_m(q)`` is the query's feature.
3. **Out-to-loss reweighting.** ``Q_m(z) = 1 − p̄(z)`` with ``p̄`` the mean correct-token probability of
   ``z`` under model ``m`` (TRAK's ``diag(1 − p)`` term; for a sequence it is the token average of the
   exact per-token weights ``1 − p_t``).
4. **Score.** ``τ(q, z) = [(1/M) Σ_m φ_m(q)ᵀ (Φ_mᵀ Φ_m + εI)⁻¹ φ_m(z)] · [(1/M) Σ_m Q_m(z)]`` (the
   paper's eq. with the ensemble average of the kernel term and of ``Q``; ``ε = 0`` by default, a
   small ridge is available for rank-deficient ``Φ``).

Sign: ``τ > 0`` when including ``z`` raises the query's margin, i.e. lowers its loss — the same
convention as msif's influence scores (positive = proponent). Left out: TRAK's soft-thresholding
(sparsification) of the scores and the structured (CUDA) projector; the projection matrix is
generated in seeded row chunks, so it is never held whole for large ``D``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from ..curvature.hooks import Recorder
from ..data.encoding import Batch
from ..models.adapters import TrackedModule
from ..objectives import data_targets, model_logits

__all__ = ["Projector", "output_function_grads", "TrakFeatures", "featurize", "trak_scores"]


class Projector:
    """Random projection ``g ↦ Pᵀ g / √k`` from ``dim`` to ``k`` dimensions (float64).

    ``kind``: ``"gaussian"`` (N(0, 1) entries) or ``"rademacher"`` (±1 entries). ``k=None`` is the
    identity (no projection; exact TRAK for tests). ``P`` is regenerated deterministically from
    ``seed`` in chunks of ``chunk`` rows, so the whole ``(dim, k)`` matrix is never stored.
    """

    def __init__(self, dim: int, k: int | None, kind: str = "rademacher", seed: int = 0, chunk: int = 8192):
        if kind not in ("gaussian", "rademacher"):
            raise ValueError(f"kind must be 'gaussian' or 'rademacher', not {kind!r}")
        if k is not None and k < 1:
            raise ValueError("k must be ≥ 1")
        self.dim, self.k, self.kind, self.seed, self.chunk = dim, k, kind, seed, chunk

    @property
    def out_dim(self) -> int:
        return self.dim if self.k is None else self.k

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of ``P`` (must be chunk-aligned at ``start``)."""
        if start % self.chunk:
            raise ValueError("start must be a multiple of the chunk size")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + start // self.chunk)
        n = stop - start
        if self.kind == "gaussian":
            return torch.randn(n, self.k, generator=g, dtype=torch.float64)
        return torch.randint(0, 2, (n, self.k), generator=g).to(torch.float64) * 2 - 1

    def matrix(self) -> torch.Tensor:
        """The whole ``P (dim, k)`` (tests, small ``dim``)."""
        return torch.cat([self.rows(s, min(s + self.chunk, self.dim)) for s in range(0, self.dim, self.chunk)])

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        """``g (B, dim)`` → ``(B, k)`` features ``g P / √k``."""
        g = g.double()
        if g.shape[-1] != self.dim:
            raise ValueError(f"expected vectors of dimension {self.dim}, got {g.shape[-1]}")
        if self.k is None:
            return g.clone()
        out = torch.zeros(*g.shape[:-1], self.k, dtype=torch.float64)
        for s in range(0, self.dim, self.chunk):
            e = min(s + self.chunk, self.dim)
            out += g[..., s:e] @ self.rows(s, e)
        return out / self.k**0.5


def output_function_grads(model: nn.Module, tms: Sequence[TrackedModule], batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example ``∇θ f(z)`` of the summed token margin, flattened in :func:`msif.curvature.exact.param_layout`
    order ``(B, D)``, and the reweighting ``Q = 1 − p̄`` ``(B,)`` (float64).

    One forward and one activation-only backward with hooks (no parameter gradients).
    """
    tms = list(tms)
    tgt = data_targets(batch, "lm")
    keep = tgt != -100
    with Recorder(model, tms) as rec:
        logits = model_logits(model, batch)
        logp = torch.log_softmax(logits.double(), dim=-1)
        lp = logp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # log p_t
        lp = torch.where(keep, lp, torch.full_like(lp, -1.0))  # any value < 0 (masked below)
        margin = lp - torch.log(-torch.expm1(lp))  # log p − log(1 − p), stable for p → 0
        f = torch.where(keep, margin, torch.zeros_like(margin)).sum(1)  # (B,)
        s = rec.output_grads(f.sum())
        a = rec.inputs
    p = lp.detach().exp()
    n = keep.sum(1).clamp_min(1)
    q = 1.0 - torch.where(keep, p, torch.zeros_like(p)).sum(1) / n
    parts = []
    for tm in tms:
        # s is zero at padding (no loss there and, with right padding, no real token sees it): no mask needed
        g = torch.einsum("bto,bti->boi", s[tm.name].double(), a[tm.name].double())
        parts.append(g.reshape(g.shape[0], -1))
    return torch.cat(parts, 1), q.double()


@dataclass
class TrakFeatures:
    """One model's projected output-function gradients: ``train (N, k)``, ``q_train (N,)`` (``1 − p̄``),
    ``queries (Q, k)``."""

    train: torch.Tensor
    q_train: torch.Tensor
    queries: torch.Tensor


def featurize(
    model: nn.Module,
    tms: Sequence[TrackedModule],
    train_batches: Iterable[Batch],
    query_batches: Iterable[Batch],
    projector: Projector,
) -> TrakFeatures:
    """Featurise the training set and the queries under one model (``train`` rows in batch order; either
    may be empty, e.g. training features on θ_pt and query features on θ_ft of a multi-stage pair)."""
    was = model.training
    model.eval()
    try:
        tr, qs, qu = [], [], []
        for b in train_batches:
            g, q = output_function_grads(model, tms, b)
            tr.append(projector(g))
            qs.append(q)
        for b in query_batches:
            g, _ = output_function_grads(model, tms, b)
            qu.append(projector(g))
    finally:
        model.train(was)
    cat = lambda xs, *shape: torch.cat(xs) if xs else torch.zeros(0, *shape, dtype=torch.float64)  # noqa: E731
    k = projector.k or projector.dim
    return TrakFeatures(cat(tr, k), cat(qs), cat(qu, k))


def trak_scores(features: Sequence[TrakFeatures], candidates: torch.Tensor | None = None, ridge: float = 0.0) -> torch.Tensor:
    """TRAK scores ``(Q, C)`` from an ensemble's features (see the module docstring).

    ``candidates`` are row indices into the training features (default: all ``N``); ``ridge`` ``ε ≥ 0``
    is added to ``Φᵀ Φ``'s diagonal (relative to its mean diagonal entry).
    """
    if not features:
        raise ValueError("TRAK needs at least one model's features")
    N = features[0].train.shape[0]
    idx = torch.arange(N) if candidates is None else torch.as_tensor(candidates, dtype=torch.long)
    kern = None
    qbar = torch.zeros(len(idx), dtype=torch.float64)
    for ft in features:
        Phi = ft.train.double()
        K = Phi.T @ Phi
        if ridge > 0:
            K = K + ridge * float(torch.diagonal(K).mean()) * torch.eye(K.shape[0], dtype=K.dtype)
        X = torch.linalg.lstsq(K, ft.queries.double().T).solution if ridge == 0 else torch.linalg.solve(K, ft.queries.double().T)
        term = X.T @ Phi[idx].T  # (Q, C)
        kern = term if kern is None else kern + term
        qbar += ft.q_train.double()[idx]
    M = len(features)
    return (kern / M) * (qbar / M)
