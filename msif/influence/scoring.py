"""Streamed candidate scoring: ``score(q, z) = Σ_blocks ⟨U_q, DW(z)⟩`` without parameter gradients.

A query is turned once into ``U`` (per tracked module, ``(Q, out, in_dim)`` for ``Q`` queries), e.g.
``U = P_pt P_ft ∇m`` for the multi-stage influence. A candidate's gradient is
``DW(z) = Σ_t s_t a_tᵀ`` (hooks on θ_pt, data labels), so its score is ``Σ_t s_tᵀ U a_t``. Two
orders compute it:

* ``direct``: ``(a_t Uᵀ) · s_t`` summed over tokens — never forms a candidate gradient, gives per-token
  scores for free; cost ``∝ Q·T·out·in`` per candidate.
* ``grads``: form ``DW(z)`` (in chunks) then contract with all ``Q`` queries; cost ``∝ (T+Q)·out·in``,
  cheaper when many queries share the pass.

``auto`` picks the cheaper one per module. A low-rank ``U`` (:func:`low_rank`) is contracted as
``Σ_k (s_tᵀ x_k)(y_kᵀ a_t)``, cost ``∝ Q·T·r·(out+in)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from ..data.encoding import Batch
from ..curvature.fit import record_batch
from ..models.adapters import TrackedModule
from ..objectives import data_targets


@dataclass
class LowRank:
    """``U ≈ X diag(σ) Yᵀ`` per block: ``X (Q, out_b, r)``, ``Y (Q, in_dim, r)`` (σ folded into X)."""

    X: dict[str, torch.Tensor]
    Y: dict[str, torch.Tensor]


def low_rank(U: dict[str, torch.Tensor], tms: list[TrackedModule], rank: int) -> dict[str, LowRank]:
    """Rank-``rank`` truncated SVD of every block of every query vector (module → :class:`LowRank`)."""
    out = {}
    for tm in tms:
        if tm.name not in U:
            continue
        X, Y = {}, {}
        for blk in tm.blocks:
            Ub = U[tm.name][:, blk.rows, :]
            u, sv, vh = torch.linalg.svd(Ub, full_matrices=False)
            r = min(rank, sv.shape[-1])
            X[blk.name] = u[..., :r] * sv[..., None, :r]
            Y[blk.name] = vh[..., :r, :].transpose(-1, -2)
        out[tm.name] = LowRank(X, Y)
    return out


@dataclass
class ScoreResult:
    """Scores of ``N`` candidates for ``Q`` queries.

    ``scores (Q, N)``; ``per_module (Q, N, M)`` over ``modules`` (names, in order); ``per_token`` (when
    asked) a list over candidates of ``(Q, T_n)`` tensors; ``indices (N,)`` the candidates' dataset
    positions, in the order scored.
    """

    scores: torch.Tensor
    per_module: torch.Tensor
    modules: list[str]
    indices: torch.Tensor
    per_token: list[torch.Tensor] | None = None
    roles: list[str] = field(default_factory=list)

    def role_shares(self) -> dict[str, torch.Tensor]:
        """Per role (mlp / attention): the share of total |influence| ``(Q,)`` over all candidates."""
        absm = self.per_module.abs().sum(1)  # (Q, M)
        tot = absm.sum(-1).clamp_min(1e-300)
        return {r: absm[:, [i for i, x in enumerate(self.roles) if x == r]].sum(-1) / tot for r in sorted(set(self.roles))}


_GRAD_CHUNK = 1 << 26  # elements of per-candidate gradients formed at once


def _order(mode: str, Q: int, T: int, tm: TrackedModule) -> str:
    if mode != "auto":
        return mode
    return "direct" if Q * T <= T + Q else "grads"


@torch.no_grad()
def _contract(a: torch.Tensor, s: torch.Tensor, U, tm: TrackedModule, order: str, want_tokens: bool):
    """Scores ``(Q, B)`` and optionally per-token ``(Q, B, T)`` for one module."""
    if isinstance(U, LowRank):
        tok = 0
        for blk in tm.blocks:
            X, Y = U.X[blk.name].to(s.dtype), U.Y[blk.name].to(a.dtype)
            sx = torch.einsum("bto,qor->qbtr", s[..., blk.rows], X)
            ay = torch.einsum("bti,qir->qbtr", a, Y)
            tok = tok + (sx * ay).sum(-1)
        return tok.sum(-1), (tok if want_tokens else None)
    U = U.to(a.dtype)
    if order == "direct" or want_tokens:
        # (B, T, in) x (Q, out, in) -> (Q, B, T, out), then dot with s
        tok = torch.einsum("qbto,bto->qbt", torch.einsum("bti,qoi->qbto", a, U), s)
        return tok.sum(-1), (tok if want_tokens else None)
    B = a.shape[0]
    step = max(1, _GRAD_CHUNK // (tm.out_features * tm.in_dim))
    parts = []
    for i in range(0, B, step):
        g = torch.einsum("bto,bti->boi", s[i : i + step], a[i : i + step])
        parts.append(torch.einsum("boi,qoi->qb", g, U))
    return torch.cat(parts, 1), None


def score_batches(
    model: nn.Module,
    tms: list[TrackedModule],
    U: dict[str, torch.Tensor | LowRank],
    batches: Iterable[Batch],
    objective: str = "lm",
    order: str = "auto",
    per_token: bool = False,
    progress=None,
) -> ScoreResult:
    """Score every candidate of ``batches`` (forward + activation-only backward on ``model``) against
    the query vectors ``U`` (module → ``(Q, out, in_dim)`` or :class:`LowRank`).

    Only modules present in ``U`` are contracted; the candidate loss is ``objective`` with data labels.
    """
    names = [tm.name for tm in tms if tm.name in U]
    if not names:
        raise ValueError("no tracked module of the model has a query vector")
    tmap = {tm.name: tm for tm in tms}
    sub = [tmap[n] for n in names]
    first = U[names[0]]
    Q = (first.X[next(iter(first.X))].shape[0]) if isinstance(first, LowRank) else first.shape[0]
    totals, modules, idx, toks = [], [], [], []
    for batch in batches:
        a, s, _ = record_batch(model, sub, batch, lambda logits: data_targets(batch, objective))
        T = batch.input_ids.shape[1]
        per_mod = []
        tok_sum = None
        for n in names:
            sc, tk = _contract(a[n], s[n], U[n], tmap[n], _order(order, Q, T, tmap[n]), per_token)
            per_mod.append(sc.double())
            if per_token:
                tok_sum = tk.double() if tok_sum is None else tok_sum + tk.double()
        pm = torch.stack(per_mod, -1)  # (Q, B, M)
        modules.append(pm)
        totals.append(pm.sum(-1))
        idx.append(batch.indices)
        if per_token:
            lens = batch.attention_mask.sum(1).tolist()
            toks.extend(tok_sum[:, i, : lens[i]] for i in range(batch.size))
        if progress is not None:
            progress(batch.size)
    if not totals:
        raise ValueError("no candidates to score")
    return ScoreResult(
        scores=torch.cat(totals, 1),
        per_module=torch.cat(modules, 1),
        modules=names,
        indices=torch.cat(idx),
        per_token=toks if per_token else None,
        roles=[tmap[n].role for n in names],
    )
