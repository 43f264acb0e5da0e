"""Exact dense curvature for tiny models (float64): per-example gradients, the GGN, GGN-vector products.

This module is the ground truth the approximations (EK-FAC, K-FAC, diagonal, the iterative iHVP
baselines) are checked against. It treats the weights (and biases) of the tracked linear layers as
the only free parameters; every other parameter of the model is frozen.

Parameter vector layout (used throughout msif)
----------------------------------------------
``θ`` is the concatenation, over the tracked modules in :func:`~msif.models.adapters.tracked_modules`
order, of each module's effective matrix ``W_eff = [W | b]`` (shape ``(out, in_dim)``, the bias as
the last column; HF ``Conv1D`` weights are transposed first) flattened **row-major**. A block of rows
``[r0, r1)`` of a module at offset ``o`` is the contiguous index range ``[o + r0*in_dim, o + r1*in_dim)``.

Objectives
----------
``"lm"`` / ``"answer"``: ``ℓ(z) = −Σ_t target_mask[t] · log p(input_ids[t+1] | logits[t])`` (summed per
sequence); ``"classification"``: ``ℓ(z) = −log p(label | x)`` from a sequence-classification model.
The dataset loss is ``L = (1/N) Σ_n ℓ(z_n)`` and the GGN is

    G = (1/N) Σ_n Σ_t J_tᵀ (diag(p_t) − p_t p_tᵀ) J_t,

``J_t`` the Jacobian of the logits at counted position ``t`` w.r.t. ``θ`` (analytic softmax Hessian:
the exact expectation over labels sampled from the model, i.e. the true Fisher).

Everything here runs in float64. A model that is not float64 is converted on a deep copy; a model in
training mode is evaluated in eval mode (dropout off) and its mode is restored afterwards.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from typing import Callable, Iterable, NamedTuple, Sequence

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..data.encoding import Batch
from ..models.adapters import TrackedModule

__all__ = [
    "Layout",
    "param_layout",
    "flatten",
    "unflatten",
    "flat_params",
    "per_example_losses",
    "flat_example_grads",
    "exact_ggn",
    "ggn_vector_product",
    "block_diagonal",
    "mean_eigenvalue",
    "damped_solve",
]

_OBJECTIVES = ("lm", "answer", "classification")


# --------------------------------------------------------------------------------------------------
# Layout


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
        return _module_ranges(self.offsets, self.D)


def _module_ranges(offsets: dict, D: int) -> dict:
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


def flatten(mats: dict[str, torch.Tensor], tms: Sequence[TrackedModule]) -> torch.Tensor:
    """Concatenate ``mats[name]`` (each ``(out, in_dim)``, or ``(out, in_dim, k)`` for k vectors at once)
    row-major in module order → ``(D,)`` (or ``(D, k)``)."""
    parts = []
    for tm in tms:
        m = mats[tm.name]
        if tuple(m.shape[:2]) != (tm.out_features, tm.in_dim):
            raise ValueError(f"{tm.name}: expected shape ({tm.out_features}, {tm.in_dim}), got {tuple(m.shape)}")
        parts.append(m.reshape(tm.out_features * tm.in_dim, *m.shape[2:]))
    return torch.cat(parts, dim=0)


def unflatten(vec: torch.Tensor, tms: Sequence[TrackedModule]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten`: ``(D,)`` (or ``(D, k)``) → ``{name: (out, in_dim)}`` (or ``(out, in_dim, k)``) views."""
    out = {}
    o = 0
    for tm in tms:
        n = tm.out_features * tm.in_dim
        out[tm.name] = vec[o : o + n].reshape(tm.out_features, tm.in_dim, *vec.shape[1:])
        o += n
    if o != vec.shape[0]:
        raise ValueError(f"vector has {vec.shape[0]} entries, the tracked modules have {o}")
    return out


def flat_params(model: nn.Module, tms: Sequence[TrackedModule]) -> torch.Tensor:
    """The current tracked parameters ``θ`` as a detached ``(D,)`` vector (the model's dtype)."""
    with torch.no_grad():
        return flatten({tm.name: tm.weight_matrix(model.get_submodule(tm.name)) for tm in tms}, tms).detach().clone()


# --------------------------------------------------------------------------------------------------
# Functional model


@contextmanager
def _eval_mode(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _as_float64(model: nn.Module) -> nn.Module:
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
    from .gvp import split_weights

    return split_weights(unflatten(theta, tms), tms)


def _check_objective(objective: str) -> str:
    if objective not in _OBJECTIVES:
        raise ValueError(f"objective must be one of {_OBJECTIVES}, not {objective!r}")
    return objective


class _Functional:
    """``θ ↦ logits`` for one model, with everything but the tracked weights frozen."""

    def __init__(self, model: nn.Module, tms: Sequence[TrackedModule]):
        self.model = model
        self.tms = list(tms)
        self.frozen = {n: p.detach() for n, p in model.named_parameters()}
        self.frozen.update({n: b for n, b in model.named_buffers()})
        self.theta0 = flat_params(model, tms)
        cfg = getattr(model, "config", None)
        self.kwargs = {"use_cache": False} if cfg is not None and hasattr(cfg, "use_cache") else {}

    def logits(self, theta: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``(B, T, V)`` for a causal LM, ``(B, C)`` for a sequence classifier."""
        params = dict(self.frozen)
        params.update(weight_dict(theta, self.tms))
        # the math SDPA backend is plain differentiable ops: forward-mode AD and vmapped backward work
        with sdpa_kernel([SDPBackend.MATH]):
            out = functional_call(
                self.model,
                params,
                args=(),
                kwargs={"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, **self.kwargs},
            )
        return out.logits if hasattr(out, "logits") else out


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
def _prepared(model: nn.Module, tms: Sequence[TrackedModule]):
    m = _as_float64(model)
    with _eval_mode(m):
        yield _Functional(m, tms)


def _batches(batches: Batch | Iterable[Batch]) -> list[Batch]:
    return [batches] if isinstance(batches, Batch) else list(batches)


# --------------------------------------------------------------------------------------------------
# Gradients


def per_example_losses(model: nn.Module, tms: Sequence[TrackedModule], batch: Batch, objective: str) -> torch.Tensor:
    """``ℓ(z_n)`` for each example of ``batch`` with the data labels, float64 ``(B,)``."""
    _check_objective(objective)
    tgt, mask = _targets(batch, objective)
    with _prepared(model, tms) as f, torch.no_grad():
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
    with _prepared(model, tms) as f:
        fn = lambda th: _losses(f.logits(th, batch), tgt, mask)  # noqa: E731
        return jacrev(fn, chunk_size=chunk_size)(f.theta0).detach()


# --------------------------------------------------------------------------------------------------
# GGN


def _softmax_hessian_apply(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``(diag(p) − p pᵀ) u`` along the last axis; ``p`` and ``u`` broadcast ``(..., V)``."""
    return p * u - p * (p * u).sum(-1, keepdim=True)


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
    _check_objective(objective)
    bs = _batches(batches)
    N = sum(b.size for b in bs)
    if N == 0:
        raise ValueError("exact_ggn needs at least one example")
    with _prepared(model, tms) as f:
        D = f.theta0.numel()
        G = torch.zeros(D, D, dtype=torch.float64)
        for b in bs:
            _, mask = _targets(b, objective)
            if not bool(mask.any()):
                continue
            sel = lambda th: f.logits(th, b)[mask]  # noqa: E731  (P, V)
            with torch.no_grad():
                p = torch.softmax(sel(f.theta0), dim=-1)
            J = jacrev(sel, chunk_size=chunk_size)(f.theta0).detach()  # (P, V, D)
            # H J per position: (diag(p) − p pᵀ) J, with J (P, V, D) and p (P, V)
            HJ = p.unsqueeze(-1) * J - p.unsqueeze(-1) * torch.einsum("pv,pvd->pd", p, J).unsqueeze(1)
            G += torch.einsum("pvd,pve->de", J, HJ)
        G /= N
    return 0.5 * (G + G.T)


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
    m = _as_float64(model)
    f = _Functional(m, tms)
    D = f.theta0.numel()
    masks = [_targets(b, objective)[1] for b in bs]

    def matvec(v: torch.Tensor) -> torch.Tensor:
        if v.shape[0] != D or v.dim() not in (1, 2):
            raise ValueError(f"expected a vector (D,) or matrix (D, k) with D={D}, got {tuple(v.shape)}")
        V = v.to(torch.float64).reshape(D, -1)
        out = torch.zeros_like(V)
        with _eval_mode(m):
            for b, mask in zip(bs, masks):
                if not bool(mask.any()):
                    continue
                fn = lambda th: f.logits(th, b)  # noqa: E731
                logits, pull = vjp(fn, f.theta0)
                p = torch.softmax(logits.detach(), dim=-1)
                keep = mask.unsqueeze(-1).to(p.dtype)
                for j in range(V.shape[1]):
                    _, jv = jvp(fn, (f.theta0,), (V[:, j].contiguous(),))
                    u = _softmax_hessian_apply(p, jv.detach()) * keep
                    out[:, j] += pull(u)[0].detach()
        out /= N
        return out.reshape(v.shape)

    matvec.dim = D  # type: ignore[attr-defined]
    return matvec


# --------------------------------------------------------------------------------------------------
# Dense helpers


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
        ranges = list(_module_ranges(offsets, D).values())
    else:
        raise ValueError(f"level must be 'block' or 'module', not {level!r}")
    out = torch.zeros_like(G)
    for s, e in ranges:
        out[s:e, s:e] = G[s:e, s:e]
    return out


def mean_eigenvalue(G: torch.Tensor) -> float:
    """``trace(G) / D``: the mean eigenvalue, the unit of relative damping."""
    return float(torch.diagonal(G).sum() / G.shape[0])


def damped_solve(G: torch.Tensor, v: torch.Tensor, damping: float) -> torch.Tensor:
    """``(G + λI)⁻¹ v`` for ``v`` of shape ``(D,)`` or ``(D, k)`` (Cholesky; LU if not positive definite)."""
    if damping < 0:
        raise ValueError("damping must be non-negative")
    A = G + damping * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    rhs = v.to(G.dtype).reshape(G.shape[0], -1)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        x = torch.cholesky_solve(rhs, L)
    else:
        x = torch.linalg.solve(A, rhs)
    return x.reshape(v.shape)
