"""The exact GGN of a causal LM with a plain linear head, through its final hidden states: ``h/V`` of the cost.

For the summed LM loss, when the logits are ``last_hidden_state @ W_Uᵀ`` with a frozen unembedding
``W_U`` (GPT-NeoX and most HF decoders), the softmax Hessian pulled back through the head is the
``h × h`` matrix ``M_t = W_Uᵀ (diag p_t − p_t p_tᵀ) W_U = R_t R_tᵀ``, so

    G = (1/N) Σ_n Σ_t J_tᵀ M_t J_t = (1/N) Σ_n K_nᵀ K_n,

``J_t`` the Jacobian of the hidden state at counted position ``t`` and ``K_n`` the stacked ``R_tᵀ J_t``
of sequence ``n``. Same ``G`` as :func:`msif.curvature.exact.exact_ggn` (tested), assembled by the
same :func:`~msif.curvature.exact.accumulate_ggn`; :func:`hidden_ggn_matvec` is its matrix-free
product for many vectors at once.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.func import jacrev, jvp, vjp, vmap

from ..data.encoding import Encoded, collate
from ..models.adapters import TrackedModule
from .exact import FunctionalModel, GGNParts, accumulate_ggn, as_float64, eval_mode

__all__ = ["HeadHessian", "hidden_ggn_rows", "hidden_ggn", "hidden_ggn_matvec"]


class HeadHessian:
    """A float64 :class:`~msif.curvature.exact.FunctionalModel` of a causal LM (a copy if needed) and its
    unembedding ``W_U (V, h)``, which must have no bias."""

    def __init__(self, model: nn.Module, tms: Sequence[TrackedModule]):
        m = as_float64(model)
        head = m.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise ValueError("the hidden-state GGN assumes an unembedding without bias")
        self.f = FunctionalModel(m, tms)
        self.model, self.theta0 = m, self.f.theta0
        self.W_U = head.weight.detach()

    def __call__(self, theta: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T, h)`` final hidden states at ``θ``."""
        return self.f.hidden_states(theta, ids, mask)

    def softmax_hessian(self, h: torch.Tensor) -> torch.Tensor:
        """``M = W_Uᵀ (diag p − p pᵀ) W_U`` ``(..., h, h)`` for hidden states ``h (..., h)``."""
        p = torch.softmax(h @ self.W_U.T, -1)
        WtP = p @ self.W_U
        return torch.einsum("...v,vi,vj->...ij", p, self.W_U, self.W_U) - WtP[..., :, None] * WtP[..., None, :]


def hidden_ggn_rows(hh: HeadHessian, examples: list[Encoded]) -> Iterator[torch.Tensor]:
    """Per sequence, the rows ``K_n (P·h, D)`` with ``G = (1/N) Σ_n K_nᵀ K_n``: the Jacobian ``J`` of the
    counted positions' hidden states by reverse mode, times ``R_t`` with ``R_t R_tᵀ = M_t``."""
    D = hh.theta0.numel()
    for e in examples:
        ids = torch.tensor([e.input_ids], dtype=torch.long)
        keep = torch.tensor(e.target_mask, dtype=torch.bool)
        if not bool(keep.any()):
            continue
        with torch.no_grad():
            ev, Q = torch.linalg.eigh(hh.softmax_hessian(hh(hh.theta0, ids)[0][keep]))
            R = Q * ev.clamp_min(0).sqrt()[:, None, :]  # M = R Rᵀ, (P, h, h)
        J = jacrev(lambda th: hh(th, ids)[0][keep])(hh.theta0).detach()  # (P, h, D)
        yield torch.einsum("pik,pid->pkd", R, J).reshape(-1, D)


def hidden_ggn(model: nn.Module, tms: Sequence[TrackedModule], examples: list[Encoded],
               ranges: Sequence[tuple[int, int]] | None = None, rows_per_gemm: int = 4096) -> GGNParts:
    """The GGN of the summed LM loss over ``examples`` (see the module docstring): the full ``(D, D)``
    matrix (``ranges=None``) or only the diagonal blocks ``G[s:e, s:e]`` of ``ranges``, float64."""
    hh = HeadHessian(model, tms)
    with eval_mode(hh.model):
        return accumulate_ggn(hidden_ggn_rows(hh, examples), hh.theta0.numel(), len(examples), ranges,
                              rows_per_gemm=rows_per_gemm)


def hidden_ggn_matvec(model: nn.Module, tms: Sequence[TrackedModule], examples: list[Encoded],
                      batch_size: int = 256) -> Callable[[torch.Tensor], torch.Tensor]:
    """Matrix-free ``V (D, k) ↦ G V`` (or ``(D,) ↦ (D,)``) for the GGN of :func:`hidden_ggn`, all ``k`` columns at once.

    Per padded batch: forward-mode ``jvp`` of the hidden states (vmapped over the columns), the ``h × h``
    softmax Hessians ``M_t`` (precomputed) at the counted positions, and one reverse-mode pull-back
    (vmapped). No ``(D, D)`` matrix and no ``V``-sized logits; the same ``G`` as
    :func:`msif.curvature.exact.ggn_vector_product` (tested), which loops over columns and batches.
    """
    hh = HeadHessian(model, tms)
    D = hh.theta0.numel()
    parts = []
    with eval_mode(hh.model):  # the model's mode is restored after building and after every product
        for i in range(0, len(examples), batch_size):
            b = collate(examples[i : i + batch_size])
            f = lambda th, b=b: hh(th, b.input_ids, b.attention_mask)  # noqa: E731
            h0, pull = vjp(f, hh.theta0)
            with torch.no_grad():
                M = hh.softmax_hessian(h0.detach()) * b.target_mask[..., None, None].to(torch.float64)
            parts.append((f, pull, M))
    N = len(examples)

    def matvec(V: torch.Tensor) -> torch.Tensor:
        X = V.to(torch.float64).reshape(D, -1)
        out = torch.zeros(X.shape[1], D, dtype=torch.float64)
        with eval_mode(hh.model):
            for f, pull, M in parts:
                JV = vmap(lambda v: jvp(f, (hh.theta0,), (v,))[1], in_dims=1)(X)  # J V: (k, B, T, h)
                U = torch.einsum("btij,kbtj->kbti", M, JV)  # M J V at the counted positions
                out += vmap(lambda u: pull(u)[0])(U).detach()  # Jᵀ M J V
        return (out.T / N).reshape(V.shape)

    matvec.dim = D  # type: ignore[attr-defined]
    return matvec
