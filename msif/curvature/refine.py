"""Query vectors past the block-diagonal ceiling: ``(G + λ)⁻¹ b`` by conjugate gradient on the full GGN,
preconditioned by EK-FAC and started from the EK-FAC answer.

EK-FAC approximates ``G`` twice over: block-diagonal across modules (and heads), Kronecker inside each
block. The expensive side of an influence score is per query, not per candidate, so a few iterations
of preconditioned CG on the exact damped GGN (matrix-free, :class:`~msif.curvature.gvp.GGNOperator`)
turn each query vector into a near-exact solve, at ``K + 1`` GGN-vector products per query for ``K``
iterations, whatever the number of candidates.

:func:`pcg` is the solver (columns independent, sharing every product); :func:`refined_chain` is the
multi-stage use: ``x = (G_ft + λ_ft)⁻¹ g`` refined on θ_ft with the fine-tuning sample, then
``u = (G_pt + λ_pt)⁻¹ x`` on θ_pt with the pre-training sample. With ``K = 0`` it returns exactly
:func:`msif.curvature.precondition.chain`'s answer.

Memory per query: ``b``, ``x``, ``r``, ``z``, ``p`` and ``A p`` — six vectors of the tracked
parameters (``6 × 4 D`` bytes in float32; 7B parameters: 168 GB per query, so refinement is for
models up to about 1B on one device) plus the product's own (:mod:`msif.curvature.gvp`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .precondition import Factored, chain

Vectors = dict[str, torch.Tensor]  # module → (k, out, in_dim)


@dataclass
class Refinement:
    """One stage's refined solve: the iterate ``x``, the relative residuals ``‖b − (G+λ)x‖ / ‖b‖`` per
    column before the first and after every iteration, the GGN-vector products (columns) it used and
    their time."""

    x: Vectors
    residuals: list[torch.Tensor] = field(default_factory=list)
    products: int = 0
    seconds: float = 0.0
    product_seconds: float = 0.0

    @property
    def iterations(self) -> int:
        return max(0, len(self.residuals) - 1)

    def summary(self) -> dict:
        r = [float(x.max()) for x in self.residuals]
        return {"iterations": self.iterations, "products": self.products, "seconds": self.seconds,
                "product_seconds": self.product_seconds, "max_relative_residual": r}


def _dot(X: Vectors, Y: Vectors) -> torch.Tensor:
    """Column-wise ``⟨X, Y⟩`` ``(k,)`` over all modules, in float64."""
    return sum((X[n].double() * Y[n].double()).sum((1, 2)) for n in X)


def _axpy(X: Vectors, a: torch.Tensor, Y: Vectors) -> None:
    """``X += a · Y`` per column, in place."""
    for n in X:
        X[n] += a.to(X[n].dtype)[:, None, None] * Y[n]


def pcg(gvp: Callable[[Vectors], Vectors], damping: float, b: Vectors, precondition: Callable[[Vectors], Vectors],
        iterations: int, tol: float = 0.0, x0: Vectors | None = None, progress=None) -> Refinement:
    """Preconditioned CG for ``(G + λ) x = b``, ``G V = gvp(V)``, ``λ = damping``, started at ``x0``
    (default ``precondition(b)``); at most ``iterations`` steps, a column stops once its relative
    residual is ≤ ``tol``. ``precondition`` must be symmetric positive definite (EK-FAC's damped
    inverse is). Returns a :class:`Refinement` (``iterations = 0``: ``x0`` itself, no product)."""
    if iterations < 0:
        raise ValueError("iterations must be ≥ 0")
    t0 = time.perf_counter()
    x = {n: v.clone() for n, v in (precondition(b) if x0 is None else x0).items()}
    res = Refinement(x)
    if iterations == 0:
        res.seconds = time.perf_counter() - t0
        return res
    calls = [0, 0.0]

    def A(V: Vectors) -> Vectors:
        t = time.perf_counter()
        out = gvp(V)
        calls[0] += next(iter(V.values())).shape[0]
        calls[1] += time.perf_counter() - t
        return {n: out[n] + damping * V[n] for n in V}

    bnorm = _dot(b, b).sqrt().clamp_min(torch.finfo(torch.float64).tiny)
    Ax = A(x)
    r = {n: b[n].to(x[n].dtype) - Ax[n] for n in x}
    del Ax
    res.residuals.append((_dot(r, r).sqrt() / bnorm).cpu())
    z = precondition(r)
    p = {n: v.clone() for n, v in z.items()}
    rz = _dot(r, z)
    for it in range(iterations):
        active = res.residuals[-1] > tol
        if not bool(active.any()):
            break
        Ap = A(p)
        pAp = _dot(p, Ap)
        if bool((pAp[active.to(pAp.device)] <= 0).any()):
            raise ValueError("G + λ is not positive definite along a CG direction (pᵀ(G+λ)p ≤ 0): increase the damping")
        alpha = torch.where(active.to(rz.device), rz / pAp.where(pAp > 0, torch.ones_like(pAp)), torch.zeros_like(rz))
        _axpy(x, alpha, p)
        _axpy(r, -alpha, Ap)
        del Ap
        res.residuals.append((_dot(r, r).sqrt() / bnorm).cpu())
        if progress is not None:
            progress(it + 1, float(res.residuals[-1].max()))
        if it + 1 == iterations:
            break
        z = precondition(r)
        rz_new = _dot(r, z)
        beta = torch.where(active.to(rz.device), rz_new / rz.where(rz != 0, torch.ones_like(rz)), torch.zeros_like(rz))
        rz = rz_new
        for n in p:
            p[n] = z[n] + beta.to(p[n].dtype)[:, None, None] * p[n]
    res.products, res.product_seconds = calls
    res.seconds = time.perf_counter() - t0
    return res


@dataclass
class Stage:
    """One stage of a refined chain: its factor set and damping (as for :func:`chain`) and the exact
    GGN-vector product of its model and sample (``None``: not refined, EK-FAC only)."""

    factors: object
    damping: object
    gvp: Callable[[Vectors], Vectors] | None = None


def refined_chain(stages: Sequence[Stage], grads: dict, iterations: int, dtype: torch.dtype | None = None,
                  tol: float = 0.0, progress=None) -> tuple[Vectors, list[Refinement]]:
    """``(G_k + λ_k)⁻¹ ⋯ (G_1 + λ_1)⁻¹ g`` per module, each stage solved by :func:`pcg` with its EK-FAC
    inverse as preconditioner and start, ``iterations`` steps per stage. ``grads``: module →
    ``(Q, out, in_dim)`` or :class:`Factored`, for exactly the modules every stage's product tracks.
    ``iterations = 0``: :func:`chain` over all stages at once (exactly today's EK-FAC vectors)."""
    pairs = [(s.factors, s.damping) for s in stages]
    if iterations == 0:
        return chain(pairs, grads, dtype), []
    if any(s.gvp is None for s in stages):
        raise ValueError("every stage needs its GGN-vector product to be refined")
    dt = dtype or stages[0].factors.dtype
    x = {n: (g.dense(dt) if isinstance(g, Factored) else g.to(dt)) for n, g in grads.items()}
    out = []
    for i, s in enumerate(stages):
        lam = s.factors.resolve_damping(s.damping)
        P = lambda V, s=s, lam=lam: chain([(s.factors, lam)], V, dt)  # noqa: E731
        say = None if progress is None else (lambda it, r, i=i: progress(i, it, r))
        r = pcg(s.gvp, lam, x, P, iterations, tol=tol, progress=say)
        out.append(r)
        x = r.x
    return x, out
