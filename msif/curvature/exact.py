"""Exact dense curvature for tiny models (float64): per-example gradients, the GGN, GGN-vector products, solves.

This module is the one dense reference the approximations (EK-FAC, K-FAC, diagonal, the iterative
iHVP baselines) and the studies of :mod:`msif.eval` are checked against. It treats the weights (and
biases) of the tracked linear layers as the only free parameters; every other parameter of the
model is frozen. Vectors are laid out as in :mod:`msif.curvature.layout` (re-exported here).

Objectives
----------
``"lm"`` / ``"answer"``: ``ℓ(z) = −Σ_t target_mask[t] · log p(input_ids[t+1] | logits[t])`` (summed per
sequence); ``"classification"``: ``ℓ(z) = −log p(label | x)`` from a sequence-classification model.
The dataset loss is ``L = (1/N) Σ_n ℓ(z_n)`` and the GGN is

    G = (1/N) Σ_n Σ_t J_tᵀ (diag(p_t) − p_t p_tᵀ) J_t,

``J_t`` the Jacobian of the logits at counted position ``t`` w.r.t. ``θ`` (analytic softmax Hessian:
the exact expectation over labels sampled from the model, i.e. the true Fisher). It is assembled from
*rows*: ``G = (1/N) Σ FᵀF`` with ``F = Bᵀ J`` per position and ``B = diag(√p) − p √pᵀ``
(``B Bᵀ = diag(p) − p pᵀ``), accumulated a chunk of rows at a time into the full matrix, its diagonal
blocks only, and/or its diagonal (:func:`accumulate_ggn`; :mod:`msif.curvature.hidden_ggn` has
cheaper rows for causal LMs with a plain linear head).

Everything here runs in float64. A model that is not float64 is converted on a deep copy; a model in
training mode is evaluated in eval mode (dropout off) and its mode is restored afterwards.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..data.encoding import Batch
from ..models.adapters import TrackedModule
from .gvp import split_weights
from .layout import Layout, flatten, from_modules, module_ranges, param_layout, to_modules, unflatten

__all__ = [
    "Layout", "param_layout", "flatten", "unflatten", "to_modules", "from_modules", "flat_params",
    "FunctionalModel", "functional_model", "per_example_losses", "flat_example_grads",
    "GGNParts", "ggn_rows", "accumulate_ggn", "ggn_parts", "exact_ggn", "ggn_vector_product",
    "block_diagonal", "mean_eigenvalue", "damped_inverse", "damped_solve", "BlockDiagonal",
]

_OBJECTIVES = ("lm", "answer", "classification")


def flat_params(model: nn.Module, tms: Sequence[TrackedModule]) -> torch.Tensor:
    """The current tracked parameters ``θ`` as a detached ``(D,)`` vector (the model's dtype)."""
    with torch.no_grad():
        return flatten({tm.name: tm.weight_matrix(model.get_submodule(tm.name)) for tm in tms}, tms).detach().clone()


# --------------------------------------------------------------------------------------------------
# Functional model


@contextmanager
def eval_mode(model: nn.Module):
    """The model in eval mode inside the block, its own mode restored afterwards."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def as_float64(model: nn.Module) -> nn.Module:
    """The model itself if it is float64, else a float64 deep copy."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "_attn_implementation", None) == "eager":
        warnings.warn(
            "the model uses eager attention, which in several HF architectures (GPT-NeoX among them) computes "
            "the attention softmax in float32: exact curvature is then only float32-accurate there. Load the "
            "model with attn_implementation='sdpa' for float64 throughout.",
            stacklevel=3,
        )
    if all(p.dtype == torch.float64 for p in model.parameters()):
        return model
    return copy.deepcopy(model).double()


def weight_dict(theta: torch.Tensor, tms: Sequence[TrackedModule]) -> dict[str, torch.Tensor]:
    """``θ (D,)`` → ``{"<module>.weight": ..., "<module>.bias": ...}`` in the modules' own storage layout."""
    return split_weights(unflatten(theta, tms), tms)


def _check_objective(objective: str) -> str:
    if objective not in _OBJECTIVES:
        raise ValueError(f"objective must be one of {_OBJECTIVES}, not {objective!r}")
    return objective


class FunctionalModel:
    """``θ ↦ logits`` (or final hidden states) for one model, everything but the tracked weights frozen."""

    def __init__(self, model: nn.Module, tms: Sequence[TrackedModule]):
        self.model = model
        self.tms = list(tms)
        self.frozen = {n: p.detach() for n, p in model.named_parameters()}
        self.frozen.update({n: b for n, b in model.named_buffers()})
        self.theta0 = flat_params(model, tms)
        cfg = getattr(model, "config", None)
        self.kwargs = {"use_cache": False} if cfg is not None and hasattr(cfg, "use_cache") else {}

    def _params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        params = dict(self.frozen)
        params.update(weight_dict(theta, self.tms))
        return params

    def logits(self, theta: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``(B, T, V)`` for a causal LM, ``(B, C)`` for a sequence classifier."""
        # the math SDPA backend is plain differentiable ops: forward-mode AD and vmapped backward work
        with sdpa_kernel([SDPBackend.MATH]):
            out = functional_call(
                self.model,
                self._params(theta),
                args=(),
                kwargs={"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, **self.kwargs},
            )
        return out.logits if hasattr(out, "logits") else out

    def hidden_states(self, theta: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T, h)``: the base model's last hidden state (after its final norm), before the LM head."""
        prefix = self.model.base_model_prefix + "."
        n = len(prefix)
        params = {k[n:]: v for k, v in self._params(theta).items() if k.startswith(prefix)}
        kw = {"input_ids": ids, **self.kwargs}
        if mask is not None:
            kw["attention_mask"] = mask
        with sdpa_kernel([SDPBackend.MATH]):
            return functional_call(self.model.base_model, params, args=(), kwargs=kw).last_hidden_state


def _targets(batch: Batch, objective: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Data targets and the mask of counted predictions: ``(B, T)`` each for token objectives
    (position ``t`` predicts ``input_ids[t+1]``), ``(B,)`` each for classification."""
    if objective == "classification":
        if batch.labels is None:
            raise ValueError("the classification objective needs batch.labels")
        return batch.labels, torch.ones_like(batch.labels, dtype=torch.bool)
    mask = batch.target_mask.clone().bool()
    mask[:, -1] = False  # the last position has no next token
    tgt = torch.zeros_like(batch.input_ids)
    tgt[:, :-1] = batch.input_ids[:, 1:]
    return tgt, mask


def _losses(logits: torch.Tensor, tgt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-example summed cross-entropy ``(B,)``."""
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    nll = torch.where(mask, nll, torch.zeros_like(nll))
    return nll if nll.dim() == 1 else nll.sum(1)


@contextmanager
def functional_model(model: nn.Module, tms: Sequence[TrackedModule]):
    """A :class:`FunctionalModel` of the float64 model (a copy if needed) in eval mode, inside the block."""
    m = as_float64(model)
    with eval_mode(m):
        yield FunctionalModel(m, tms)


def _batches(batches: Batch | Iterable[Batch]) -> list[Batch]:
    return [batches] if isinstance(batches, Batch) else list(batches)


# --------------------------------------------------------------------------------------------------
# Gradients


def per_example_losses(model: nn.Module, tms: Sequence[TrackedModule], batch: Batch, objective: str) -> torch.Tensor:
    """``ℓ(z_n)`` for each example of ``batch`` with the data labels, float64 ``(B,)``."""
    _check_objective(objective)
    tgt, mask = _targets(batch, objective)
    with functional_model(model, tms) as f, torch.no_grad():
        return _losses(f.logits(f.theta0, batch), tgt, mask)


def flat_example_grads(
    model: nn.Module, tms: Sequence[TrackedModule], batch: Batch, objective: str, chunk_size: int | None = None
) -> torch.Tensor:
    """Gradients ``∇θ ℓ(z_n)`` (data labels) of every example of ``batch``: float64 ``(B, D)``.

    Row ``n`` is laid out as the parameter vector (see the module docstring). ``chunk_size`` bounds
    how many examples' backward passes are vectorised at once.
    """
    _check_objective(objective)
    tgt, mask = _targets(batch, objective)
    with functional_model(model, tms) as f:
        fn = lambda th: _losses(f.logits(th, batch), tgt, mask)  # noqa: E731
        return jacrev(fn, chunk_size=chunk_size)(f.theta0).detach()


# --------------------------------------------------------------------------------------------------
# GGN


def _softmax_hessian_apply(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``(diag(p) − p pᵀ) u`` along the last axis; ``p`` and ``u`` broadcast ``(..., V)``."""
    return p * u - p * (p * u).sum(-1, keepdim=True)


@dataclass
class GGNParts:
    """What :func:`accumulate_ggn` summed: the full ``(D, D)`` GGN, its diagonal blocks ``G[s:e, s:e]``
    (one per range asked for), its diagonal ``(D,)``; ``None`` where not asked for."""

    full: torch.Tensor | None = None
    blocks: list[torch.Tensor] | None = None
    diagonal: torch.Tensor | None = None


def ggn_rows(f: FunctionalModel, batches: Iterable[Batch], objective: str, chunk_size: int | None = None) -> Iterator[torch.Tensor]:
    """Per batch with counted positions, the rows ``F = Bᵀ J`` ``(P·V, D)`` of ``Σ_t J_tᵀ H_t J_t = FᵀF``.

    ``J (P, V, D)``: the Jacobian of the counted logits (reverse mode, ``chunk_size`` rows vectorised
    at once); ``B = diag(√p) − p √pᵀ`` per position, the exact square root of ``H = diag(p) − p pᵀ``.
    """
    for b in batches:
        _, mask = _targets(b, objective)
        if not bool(mask.any()):
            continue
        sel = lambda th, b=b, mask=mask: f.logits(th, b)[mask]  # noqa: E731  (P, V)
        with torch.no_grad():
            p = torch.softmax(sel(f.theta0), dim=-1)
        J = jacrev(sel, chunk_size=chunk_size)(f.theta0).detach()  # (P, V, D)
        sq = p.sqrt()
        B = torch.diag_embed(sq) - p.unsqueeze(-1) * sq.unsqueeze(-2)  # (P, V, V): B[v, k]
        yield torch.einsum("pvk,pvd->pkd", B, J).reshape(-1, J.shape[-1])


def accumulate_ggn(rows: Iterable[torch.Tensor], D: int, N: int, ranges: Sequence[tuple[int, int]] | None = None,
                   diagonal: bool = False, rows_per_gemm: int = 4096) -> GGNParts:
    """``G = (1/N) Σ FᵀF`` from row chunks ``F (r, D)``: the full matrix (``ranges=None``) or only the
    diagonal blocks of ``ranges`` (``Σ_b (e_b − s_b)²`` memory and products instead of ``D²``), and with
    ``diagonal`` also ``diag(G)``. Rows are gathered to at least ``rows_per_gemm`` per product."""
    full = torch.zeros(D, D, dtype=torch.float64) if ranges is None else None
    blocks = None if ranges is None else [torch.zeros(e - s, e - s, dtype=torch.float64) for s, e in ranges]
    diag = torch.zeros(D, dtype=torch.float64) if diagonal else None

    def add(F: torch.Tensor) -> None:
        if diag is not None:
            diag.add_((F * F).sum(0))
        if full is not None:
            full.addmm_(F.T, F)
        else:
            for (s, e), Gb in zip(ranges, blocks):
                Gb.addmm_(F[:, s:e].T, F[:, s:e])

    pending: list[torch.Tensor] = []
    n_rows = 0
    for F in rows:
        pending.append(F)
        n_rows += F.shape[0]
        if n_rows >= rows_per_gemm:
            add(torch.cat(pending))
            pending, n_rows = [], 0
    if pending:
        add(torch.cat(pending))
    if diag is not None:
        diag /= N
    if full is not None:
        full /= N
        full = 0.5 * (full + full.T)
    return GGNParts(full, None if blocks is None else [0.5 * (Gb + Gb.T) / N for Gb in blocks], diag)


def ggn_parts(model: nn.Module, tms: Sequence[TrackedModule], batches: Batch | Iterable[Batch], objective: str,
              ranges: Sequence[tuple[int, int]] | None = None, diagonal: bool = False, rows_per_gemm: int = 6000,
              chunk_size: int | None = None) -> GGNParts:
    """The GGN of the module docstring over ``batches`` (``N`` = their examples), as :func:`accumulate_ggn`
    parts: the full ``(D, D)`` matrix, or the diagonal blocks of ``ranges``; ``diag(G)`` with ``diagonal``."""
    _check_objective(objective)
    bs = _batches(batches)
    N = sum(b.size for b in bs)
    if N == 0:
        raise ValueError("the GGN needs at least one example")
    with functional_model(model, tms) as f:
        return accumulate_ggn(ggn_rows(f, bs, objective, chunk_size), f.theta0.numel(), N, ranges, diagonal, rows_per_gemm)


def exact_ggn(
    model: nn.Module,
    tms: Sequence[TrackedModule],
    batches: Batch | Iterable[Batch],
    objective: str,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The dense GGN ``G = (1/N) Σ_n Σ_t J_tᵀ (diag(p_t) − p_t p_tᵀ) J_t`` as float64 ``(D, D)``.

    ``N`` is the total number of examples over ``batches`` (a :class:`Batch` or an iterable of them);
    the sum over ``t`` runs over counted positions only (``target_mask``; every example once for
    classification). Materialises the Jacobian of the counted logits of one batch, ``(P, V, D)``:
    for tiny models only. ``chunk_size`` bounds how many rows of the Jacobian are vectorised at once.
    """
    return ggn_parts(model, tms, batches, objective, chunk_size=chunk_size).full


def ggn_vector_product(
    model: nn.Module,
    tms: Sequence[TrackedModule],
    batches: Batch | Iterable[Batch],
    objective: str,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function ``v ↦ G v`` for ``v`` of shape ``(D,)`` or ``(D, k)``, never materialising ``G``.

    Each product runs, per batch, a forward-mode ``jvp`` to the logits (``J v``), multiplies by the
    softmax Hessian at the counted positions, and pulls back with a ``vjp`` (``Jᵀ H J v``); the
    result is divided by the number of examples ``N``. Same ``G`` as :func:`exact_ggn`, at the
    parameters the model has when this is called (a snapshot: later changes to the model are not
    seen). The returned function holds a float64 copy of the model if the model was not float64.
    """
    _check_objective(objective)
    bs = _batches(batches)
    N = sum(b.size for b in bs)
    if N == 0:
        raise ValueError("ggn_vector_product needs at least one example")
    m = as_float64(model)
    f = FunctionalModel(m, tms)
    D = f.theta0.numel()
    masks = [_targets(b, objective)[1] for b in bs]

    def matvec(v: torch.Tensor) -> torch.Tensor:
        if v.shape[0] != D or v.dim() not in (1, 2):
            raise ValueError(f"expected a vector (D,) or matrix (D, k) with D={D}, got {tuple(v.shape)}")
        V = v.to(torch.float64).reshape(D, -1)
        out = torch.zeros_like(V)
        with eval_mode(m):
            for b, mask in zip(bs, masks):
                if not bool(mask.any()):
                    continue
                fn = lambda th: f.logits(th, b)  # noqa: E731
                logits, pull = vjp(fn, f.theta0)  # the forward, kept for the pull-back Jᵀ
                p = torch.softmax(logits.detach(), dim=-1)
                keep = mask.unsqueeze(-1).to(p.dtype)
                for j in range(V.shape[1]):
                    _, jv = jvp(fn, (f.theta0,), (V[:, j].contiguous(),))  # J v
                    u = _softmax_hessian_apply(p, jv.detach()) * keep  # H J v at the counted positions
                    out[:, j] += pull(u)[0].detach()  # Jᵀ H J v
        out /= N
        return out.reshape(v.shape)

    matvec.dim = D  # type: ignore[attr-defined]
    return matvec


# --------------------------------------------------------------------------------------------------
# Dense solves


def block_diagonal(G: torch.Tensor, layout: Layout | tuple, level: str = "block") -> torch.Tensor:
    """``G (D, D)`` restricted to its diagonal blocks (zero elsewhere), a new tensor.

    ``level="block"`` keeps the tracked blocks of ``layout`` (per-head Q/K/V blocks when the modules
    were split per head); ``level="module"`` keeps whole modules (their ranges follow
    from ``offsets`` and ``D``). ``layout`` is :func:`param_layout`'s ``(offsets, blocks, D)``.
    """
    offsets, blocks, D = layout[0], layout[1], layout[2]
    if G.shape != (D, D):
        raise ValueError(f"G has shape {tuple(G.shape)}, layout has D={D}")
    if level == "block":
        ranges = list(blocks.values())
    elif level == "module":
        ranges = list(module_ranges(offsets, D).values())
    else:
        raise ValueError(f"level must be 'block' or 'module', not {level!r}")
    out = torch.zeros_like(G)
    for s, e in ranges:
        out[s:e, s:e] = G[s:e, s:e]
    return out


def mean_eigenvalue(G: torch.Tensor) -> float:
    """``trace(G) / D``: the mean eigenvalue, the unit of relative damping."""
    return float(torch.diagonal(G).sum() / G.shape[0])


def damped_inverse(G: torch.Tensor, damping: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """``v ↦ (G + λI)⁻¹ v`` for ``v`` of shape ``(n,)`` or ``(n, k)``, factorised once here (Cholesky;
    LU if ``G + λI`` is not positive definite)."""
    if damping < 0:
        raise ValueError("damping must be non-negative")
    A = G + damping * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    L, info = torch.linalg.cholesky_ex(A)
    pd = int(info) == 0

    def solve(v: torch.Tensor) -> torch.Tensor:
        rhs = v.to(G.dtype).reshape(G.shape[0], -1)
        return (torch.cholesky_solve(rhs, L) if pd else torch.linalg.solve(A, rhs)).reshape(v.shape)

    return solve


def damped_solve(G: torch.Tensor, v: torch.Tensor, damping: float) -> torch.Tensor:
    """``(G + λI)⁻¹ v`` for ``v`` of shape ``(D,)`` or ``(D, k)`` (Cholesky; LU if not positive definite)."""
    return damped_inverse(G, damping)(v)


class BlockDiagonal:
    """``G`` restricted to diagonal blocks: ``blocks[i] = G[s:e, s:e]`` for ``ranges[i] = (s, e)``.

    :meth:`solve` is ``(G_bd + λI)⁻¹ V`` for ``V (D, k)``; rows outside every range come back zero.
    """

    def __init__(self, blocks: Sequence[torch.Tensor], ranges: Sequence[tuple[int, int]]):
        self.blocks, self.ranges = list(blocks), list(ranges)
        self._eigh = None

    @classmethod
    def of(cls, G: torch.Tensor, ranges: Sequence[tuple[int, int]]) -> "BlockDiagonal":
        """The blocks of a dense ``G`` (views)."""
        return cls([G[s:e, s:e] for s, e in ranges], ranges)

    def inverse(self, damping: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """``V ↦ (G_bd + λI)⁻¹ V``, every block factorised once here (:func:`damped_inverse`)."""
        inverses = [damped_inverse(Gb, damping) for Gb in self.blocks]

        def solve(V: torch.Tensor) -> torch.Tensor:
            out = torch.zeros_like(V)
            for inv, (s, e) in zip(inverses, self.ranges):
                out[s:e] = inv(V[s:e])
            return out

        return solve

    def solve(self, V: torch.Tensor, damping: float, method: str = "cholesky") -> torch.Tensor:
        """``(G_bd + λI)⁻¹ V``. ``method="cholesky"``: one factorisation per block and damping;
        ``"eigh"``: one eigendecomposition per block for every damping (cheaper for many dampings)."""
        if method == "cholesky":
            return self.inverse(damping)(V)
        if method != "eigh":
            raise ValueError(f"method must be 'cholesky' or 'eigh', not {method!r}")
        if self._eigh is None:
            self._eigh = [torch.linalg.eigh(Gb) for Gb in self.blocks]
        out = torch.zeros_like(V)
        for (s, e), (ev, U) in zip(self.ranges, self._eigh):
            out[s:e] = U @ ((U.T @ V[s:e]) / (ev + damping).unsqueeze(-1))
        return out
