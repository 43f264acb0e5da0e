"""Work of each stage in FLOPs and data passes."""

from __future__ import annotations

from .settings import PlanSettings
from .shape import ModelShape


def forward_flops(shape: ModelShape, T: int) -> float:
    """FLOPs of one forward of a ``T``-token sequence: ``2·(P + d·V)`` per token plus ``4·T·d`` per
    token and layer for the attention products."""
    return T * (2 * (shape.tracked_params + shape.hidden * shape.vocab) + 4 * T * shape.hidden * shape.layers)


def train_flops(shape: ModelShape, T: int) -> float:
    """A training step (forward + backward with parameter gradients): three forwards."""
    return 3 * forward_flops(shape, T)


def stats_flops(shape: ModelShape, T: int, pass_: str) -> float:
    """Per sequence: covariance products, or (Λ pass) rotations + per-sequence gradients + squares."""
    from ..curvature.passes import gram_flops

    tot = 0.0
    for m in shape.modules:
        if pass_ == "cov":
            tot += gram_flops(T, m.in_dim - m.bias)  # the bias column enters as a sum, not a product
            tot += sum(gram_flops(T, o) for o in m.blocks)
        else:
            rot = 2 * T * (m.in_dim ** 2 + sum(o * o for o in m.blocks))
            tot += rot + 2 * T * m.out * m.in_dim + 2 * m.out * m.in_dim
    return tot


def fit_flops(shape: ModelShape, s: PlanSettings, n: int, T: int) -> dict[str, float]:
    """Work of a fit on ``n`` sequences of ``T`` tokens: passes and FLOPs (forward + activation backward
    ≈ two forwards per pass, plus the statistics and the eigendecompositions)."""
    pass_f = 2 * forward_flops(shape, T)
    passes = {"ekfac": 2, "kfac": 1, "diagonal": 1, "identity": 0}[s.strategy] + s.refine
    fl = 0.0
    if s.strategy in ("ekfac", "kfac"):
        fl += n * (pass_f + stats_flops(shape, T, "cov"))
    if s.strategy in ("ekfac", "diagonal"):
        fl += n * (pass_f + stats_flops(shape, T, "lam"))
    fl += s.refine * n * (pass_f + 2 * stats_flops(shape, T, "lam"))
    eig = 0.0
    if s.strategy in ("ekfac", "kfac"):
        eig = 9.0 * sum(m.in_dim ** 3 + sum(o ** 3 for o in m.blocks) for m in shape.modules) * (1 + s.refine)
    return {"passes": passes, "flops": fl + eig, "eig_flops": eig}


def scoring_flops(shape: ModelShape, s: PlanSettings, rank: int | None) -> float:
    """Forward + activation backward per candidate, plus the contraction with the ``Q`` query vectors."""
    T, Q = s.tokens, s.queries
    con = 0.0
    for m in shape.modules:
        if rank is not None:
            con += 2 * Q * T * sum(min(rank, o) for o in m.blocks) * (m.out + m.in_dim)
        else:
            con += 2 * m.out * m.in_dim * (Q * T if Q == 1 else T + Q)
    return (s.candidates or s.documents) * (2 * forward_flops(shape, T) + con)


def query_flops(shape: ModelShape, s: PlanSettings) -> float:
    pre = sum(4 * (o * o * m.in_dim + o * m.in_dim ** 2) for m in shape.modules for o in m.blocks)
    grads = 2 * s.query_tokens * shape.tracked_params
    return s.queries * (2 * forward_flops(shape, s.query_tokens) + grads + 2 * pre)
