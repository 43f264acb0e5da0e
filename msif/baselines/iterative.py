"""Iterative inverse-Hessian(GGN)-vector-product baselines: conjugate gradient, LiSSA, Arnoldi.

All solvers take a ``matvec``: a callable ``v ↦ G v`` for a symmetric positive semi-definite ``G``
(``(D, D)``, never materialised), which must accept a vector ``(D,)`` and a matrix ``(D, k)``
(k right-hand sides at once; a dense ``G`` gives ``lambda v: G @ v``, and
:func:`msif.curvature.exact.ggn_vector_product` returns one). The damping ``λ ≥ 0`` is absolute and
applied on the fly: every solver targets

    x = (G + λI)⁻¹ v

with that sign (positive definite system; no negation anywhere). Everything runs in float64.

* :func:`conjugate_gradient`: the ground-truth solver; checks convergence of the **true** residual
  ``‖(G+λI)x − v‖ ≤ tol ‖v‖`` per right-hand side and raises (or warns) when it is not reached.
* :func:`lissa`: the truncated Neumann series of Agarwal et al. (2017), ``h_j = v + (I − (G+λI)/s) h_{j−1}``,
  ``x ≈ h_depth / s``; stable (monotone) for a scale ``s > λ_max + λ`` (it diverges for ``s < (λ_max+λ)/2``),
  see :func:`power_iteration` for ``λ_max``. Stochastic when given several matvecs (one drawn per step).
* :func:`arnoldi`: Schioppa et al. (2022): an Arnoldi iteration (full re-orthogonalisation) gives
  the top-k eigenpairs ``(λ_i, u_i)`` of ``G``; then ``(G+λI)⁻¹ v ≈ Σ_i u_i u_iᵀ v / (λ_i + λ)``
  (:meth:`ArnoldiResult.ihvp`), or the influence is taken in the k-dimensional projection
  (:meth:`ArnoldiResult.project`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..errors import MsifError

__all__ = [
    "NotConvergedError",
    "ConvergenceWarning",
    "LissaDivergedError",
    "CGResult",
    "conjugate_gradient",
    "power_iteration",
    "LissaResult",
    "lissa",
    "ArnoldiResult",
    "arnoldi",
]

Matvec = Callable[[torch.Tensor], torch.Tensor]


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped before reaching its tolerance."""


class NotConvergedError(MsifError, RuntimeError):
    """Conjugate gradient did not reach its tolerance; ``.result`` holds the unconverged :class:`CGResult`."""

    def __init__(self, message: str, result: "CGResult"):
        super().__init__(message)
        self.result = result


class LissaDivergedError(MsifError, FloatingPointError):
    """The LiSSA recursion blew up: the scale is too small for ``λ_max + λ``."""


def _as_matrix(v: torch.Tensor) -> torch.Tensor:
    if v.dim() not in (1, 2):
        raise ValueError(f"right-hand side must be (D,) or (D, k), got shape {tuple(v.shape)}")
    return v.to(torch.float64).reshape(v.shape[0], -1)


def _apply(matvec: Matvec, X: torch.Tensor) -> torch.Tensor:
    """``matvec`` on a ``(D, k)`` block, checked and in float64."""
    Y = matvec(X)
    if Y.shape != X.shape:
        raise ValueError(f"matvec returned shape {tuple(Y.shape)} for input {tuple(X.shape)}")
    return Y.to(torch.float64)


# --------------------------------------------------------------------------------------------------
# Conjugate gradient


@dataclass
class CGResult:
    """Output of :func:`conjugate_gradient`.

    ``x``: the solution, shaped like the right-hand side ``(D,)`` / ``(D, k)``;
    ``residuals``: ``(iterations + 1, k)`` relative residual norms ``‖r_j‖/‖v‖`` of the CG recurrence
    (NaN once a column has converged and stopped);
    ``true_residual``: ``(k,)`` final ``‖(G+λI)x − v‖ / ‖v‖`` recomputed from ``x``;
    ``converged``: every column's true relative residual is ``≤ tol``; ``iterations``: matvec rounds used.
    """

    x: torch.Tensor
    residuals: torch.Tensor
    true_residual: torch.Tensor
    converged: bool
    iterations: int
    tol: float


def conjugate_gradient(
    matvec: Matvec,
    v: torch.Tensor,
    damping: float,
    tol: float = 1e-10,
    max_iter: int | None = None,
    x0: torch.Tensor | None = None,
    on_fail: str = "raise",
) -> CGResult:
    """Solve ``(G + λI) x = v`` by conjugate gradient, for ``v`` of shape ``(D,)`` or ``(D, k)``.

    The k columns are independent CG runs sharing batched matvecs (a column stops once converged).
    Convergence means ``‖(G+λI)x − v‖ ≤ tol · ‖v‖`` for the residual **recomputed from x** (columns
    whose recurrence residual converged but whose true residual did not are restarted from it).
    ``max_iter`` defaults to ``2 D``. When not converged: ``on_fail="raise"`` raises
    :class:`NotConvergedError` (its ``.result`` has the iterate), ``"warn"`` warns with
    :class:`ConvergenceWarning`, ``"ignore"`` does neither; ``result.converged`` says so in any case.
    """
    if on_fail not in ("raise", "warn", "ignore"):
        raise ValueError(f"on_fail must be 'raise', 'warn' or 'ignore', not {on_fail!r}")
    if damping < 0:
        raise ValueError("damping must be non-negative")
    B = _as_matrix(v)
    D, k = B.shape
    if max_iter is None:
        max_iter = 2 * D

    def A(X: torch.Tensor) -> torch.Tensor:
        return _apply(matvec, X) + damping * X

    bnorm = B.norm(dim=0)
    safe = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    X = torch.zeros_like(B) if x0 is None else _as_matrix(x0).clone()
    R = B - A(X) if x0 is not None else B.clone()
    P = R.clone()
    rs = (R * R).sum(0)
    rel = rs.sqrt() / safe
    history = [rel.clone()]
    active = rel > tol
    it = 0
    restarts_left = 3
    while it < max_iter:
        if not bool(active.any()):
            # the recurrence says converged: check the true residual, restart the columns that fail
            true = (B - A(X)).norm(dim=0) / safe
            bad = true > tol
            if not bool(bad.any()) or restarts_left == 0:
                break
            restarts_left -= 1
            R[:, bad] = (B - A(X))[:, bad]
            P[:, bad] = R[:, bad]
            rs[bad] = (R[:, bad] ** 2).sum(0)
            active = bad
        idx = active.nonzero().squeeze(1)
        Pa = P[:, idx]
        APa = A(Pa)
        pAp = (Pa * APa).sum(0)
        if bool((pAp <= 0).any()):
            raise ValueError("G + λI is not positive definite along a CG direction (pᵀAp ≤ 0); increase damping")
        alpha = rs[idx] / pAp
        X[:, idx] += alpha * Pa
        R[:, idx] -= alpha * APa
        rs_new = (R[:, idx] ** 2).sum(0)
        beta = rs_new / rs[idx]
        P[:, idx] = R[:, idx] + beta * Pa
        rs[idx] = rs_new
        it += 1
        rel = torch.full((k,), float("nan"), dtype=torch.float64)
        rel[idx] = rs_new.sqrt() / safe[idx]
        history.append(rel)
        active = active.clone()
        active[idx] = rel[idx] > tol

    true = (B - A(X)).norm(dim=0) / safe
    converged = bool((true <= tol).all())
    res = CGResult(X.reshape(v.shape), torch.stack(history), true, converged, it, tol)
    if not converged and on_fail != "ignore":
        msg = (
            f"conjugate gradient did not converge: relative residual {float(true.max()):.3e} > tol {tol:.1e} "
            f"after {it} iterations (max_iter={max_iter}); raise max_iter or damping"
        )
        if on_fail == "raise":
            raise NotConvergedError(msg, res)
        warnings.warn(msg, ConvergenceWarning, stacklevel=2)
    return res


# --------------------------------------------------------------------------------------------------
# Power iteration and LiSSA


def power_iteration(
    matvec: Matvec,
    dim: int,
    iters: int = 500,
    tol: float = 1e-10,
    v0: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[float, torch.Tensor]:
    """Largest eigenvalue of a PSD ``G`` by power iteration: ``(λ_max, u (D,))``.

    Stops when the Rayleigh quotient changes by at most ``tol`` (relative) between iterations. The
    estimate approaches ``λ_max`` from below; give a margin when using it as a bound.
    """
    x = torch.randn(dim, 1, dtype=torch.float64, generator=generator) if v0 is None else _as_matrix(v0).clone()
    x /= x.norm()
    lam = 0.0
    for _ in range(iters):
        y = _apply(matvec, x)
        new = float((x * y).sum())
        n = y.norm()
        if n == 0:
            return 0.0, x.squeeze(1)
        x = y / n
        if abs(new - lam) <= tol * abs(new):
            lam = new
            break
        lam = new
    return lam, x.squeeze(1)


@dataclass
class LissaResult:
    """Output of :func:`lissa`: ``x`` shaped like ``v``; ``scale`` used; ``update_norms`` ``(repeats, depth)``:
    the largest relative change ``‖h_j − h_{j−1}‖ / ‖h_j‖`` over columns at each step (→ 0 when converged)."""

    x: torch.Tensor
    scale: float
    update_norms: torch.Tensor = field(repr=False)


def lissa(
    matvec: Matvec | Sequence[Matvec],
    v: torch.Tensor,
    damping: float,
    scale: float | None = None,
    depth: int = 1000,
    repeats: int = 1,
    generator: torch.Generator | None = None,
    scale_margin: float = 1.1,
    blowup: float = 1e3,
) -> LissaResult:
    """LiSSA estimate of ``(G + λI)⁻¹ v`` for ``v`` ``(D,)`` or ``(D, k)``.

    Recursion (per repeat): ``h_0 = v``, ``h_j = v + h_{j−1} − (G_j h_{j−1} + λ h_{j−1}) / s``; the
    estimate is ``h_depth / s``, averaged over ``repeats``. With one ``matvec`` (deterministic ``G``)
    the error contracts by ``1 − (λ_min + λ)/s`` per step and repeats are identical. With a sequence
    of matvecs (e.g. per-minibatch GGNs whose mean is ``G``) each step draws one at random with
    ``generator``, and repeats average out the noise.

    ``scale`` ``s`` must exceed ``λ_max + λ`` (monotone convergence; the recursion diverges for
    ``s < (λ_max + λ)/2``); ``None`` estimates ``λ_max`` of the (mean) matvec by :func:`power_iteration`
    and uses ``s = scale_margin · (λ_max + λ)``. Raises :class:`LissaDivergedError` when the iterate
    becomes non-finite or exceeds ``blowup · (j+1) · ‖v‖`` at step ``j`` (a stable recursion with a PSD
    ``G`` stays below ``(j+1) ‖v‖``).
    """
    mvs = [matvec] if callable(matvec) else list(matvec)
    if not mvs:
        raise ValueError("lissa needs at least one matvec")
    if damping < 0:
        raise ValueError("damping must be non-negative")
    Vm = _as_matrix(v)
    D = Vm.shape[0]
    if scale is None:
        mean_mv = mvs[0] if len(mvs) == 1 else (lambda X: sum(_apply(m, X) for m in mvs) / len(mvs))
        lam_max, _ = power_iteration(mean_mv, D, generator=generator)
        scale = scale_margin * (lam_max + damping)
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    # for any stable scale ‖I − (G+λI)/s‖ ≤ 1, hence ‖h_j‖ ≤ (j+1)‖v‖: far beyond that means divergence
    vnorm = max(float(Vm.norm(dim=0).max()), 1e-300)
    est = torch.zeros_like(Vm)
    norms = torch.zeros(repeats, depth, dtype=torch.float64)
    for r in range(repeats):
        h = Vm.clone()
        for j in range(depth):
            mv = mvs[0] if len(mvs) == 1 else mvs[int(torch.randint(len(mvs), (1,), generator=generator))]
            h_new = Vm + h - (_apply(mv, h) + damping * h) / scale
            hn = h_new.norm(dim=0)
            norms[r, j] = float(((h_new - h).norm(dim=0) / torch.where(hn > 0, hn, torch.ones_like(hn))).max())
            h = h_new
            total = float(hn.max()) if hn.numel() else 0.0
            if not math.isfinite(total) or total > blowup * (j + 2) * vnorm:
                raise LissaDivergedError(
                    f"LiSSA diverged at step {j} of repeat {r} (‖h‖={total:.3e}): scale {scale:.4g} is too "
                    "small; it must exceed λ_max + damping (see power_iteration)"
                )
        est += h / scale
    est /= repeats
    return LissaResult(est.reshape(v.shape), float(scale), norms)


# --------------------------------------------------------------------------------------------------
# Arnoldi (Schioppa et al. 2022)


@dataclass
class ArnoldiResult:
    """Top-k eigenpairs of ``G`` from :func:`arnoldi`.

    ``eigenvalues``: ``(k,)`` descending; ``eigenvectors``: ``(D, k)`` orthonormal columns (Ritz vectors);
    ``n_iter``: Arnoldi steps taken; ``ritz_values``: all ``(n_iter,)`` Ritz values, descending.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    n_iter: int
    ritz_values: torch.Tensor = field(repr=False)

    def _weights(self, damping: float, power: float) -> torch.Tensor:
        den = self.eigenvalues + damping
        if bool((den <= 0).any()):
            raise ValueError(
                f"λ_i + damping ≤ 0 for some eigenvalue (min λ_i = {float(self.eigenvalues.min()):.3e}); "
                "use a positive damping or fewer eigenpairs"
            )
        return den ** (-power)

    def ihvp(self, v: torch.Tensor, damping: float) -> torch.Tensor:
        """``Σ_i u_i u_iᵀ v / (λ_i + λ)`` for ``v`` ``(D,)`` or ``(D, m)``; same shape as ``v``.

        The inverse restricted to the top-k eigen-subspace (the component of ``v`` outside it is dropped).
        """
        V = _as_matrix(v)
        U = self.eigenvectors
        return (U @ (self._weights(damping, 1.0)[:, None] * (U.T @ V))).reshape(v.shape)

    def project(self, v: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
        """Projection-only variant: ``diag(λ_i + λ)^{-1/2} Uᵀ v``, ``(k,)`` or ``(k, m)``.

        The influence of ``g_train`` on ``g_test`` is then ``project(g_test)ᵀ project(g_train)``
        ``= g_testᵀ · ihvp(g_train)``, computed in the k-dimensional space (Schioppa et al.'s form;
        ``damping=0`` gives their undamped ``1/λ_i`` weighting).
        """
        V = _as_matrix(v)
        P = self._weights(damping, 0.5)[:, None] * (self.eigenvectors.T @ V)
        return P.reshape(-1) if v.dim() == 1 else P


def arnoldi(
    matvec: Matvec,
    dim: int,
    n_iter: int,
    top_k: int,
    v0: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    breakdown_tol: float = 1e-12,
) -> ArnoldiResult:
    """Top-``top_k`` eigenpairs of a symmetric PSD ``G (dim, dim)`` by ``n_iter`` Arnoldi steps.

    Builds an orthonormal Krylov basis ``Q (D, n)`` with full (twice-applied) Gram-Schmidt and the
    projected matrix ``H = Qᵀ G Q (n, n)`` (symmetrised), whose eigenpairs give the Ritz pairs
    ``(θ_i, Q s_i)``; the ``top_k`` largest are kept. If the Krylov space becomes invariant (breakdown,
    ``h_{j+1,j} ≤ breakdown_tol · ‖H‖``) the iteration continues from a fresh random vector orthogonal to
    the basis, so ``n_iter = dim`` always spans the whole space and reproduces ``G`` exactly.
    """
    if not 1 <= top_k <= n_iter:
        raise ValueError(f"need 1 ≤ top_k ≤ n_iter, got top_k={top_k}, n_iter={n_iter}")
    n_iter = min(n_iter, dim)
    top_k = min(top_k, n_iter)
    Q = torch.zeros(dim, n_iter, dtype=torch.float64)
    H = torch.zeros(n_iter, n_iter, dtype=torch.float64)

    def orth(w: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Orthogonalise ``w`` against ``Q[:, :j]`` twice; returns (w, coefficients)."""
        c = torch.zeros(j, dtype=torch.float64)
        for _ in range(2):
            h = Q[:, :j].T @ w
            w = w - Q[:, :j] @ h
            c += h
        return w, c

    q = torch.randn(dim, dtype=torch.float64, generator=generator) if v0 is None else v0.to(torch.float64).reshape(-1).clone()
    Q[:, 0] = q / q.norm()
    hscale = 0.0
    for j in range(n_iter):
        w = _apply(matvec, Q[:, j : j + 1]).squeeze(1)
        w, c = orth(w, j + 1)
        H[: j + 1, j] = c
        hscale = max(hscale, float(c.abs().max()))
        if j + 1 == n_iter:
            break
        beta = float(w.norm())
        if beta <= breakdown_tol * max(hscale, 1e-300):
            # invariant subspace: continue with a random direction orthogonal to the basis
            for _ in range(10):
                r, _ = orth(torch.randn(dim, dtype=torch.float64, generator=generator), j + 1)
                if float(r.norm()) > 1e-8:
                    break
            Q[:, j + 1] = r / r.norm()
        else:
            H[j + 1, j] = beta
            Q[:, j + 1] = w / beta
    Hs = 0.5 * (H + H.T)
    theta, S = torch.linalg.eigh(Hs)
    order = torch.argsort(theta, descending=True)
    theta, S = theta[order], S[:, order]
    U = Q @ S[:, :top_k]
    return ArnoldiResult(theta[:top_k].clone(), U, n_iter, theta)
