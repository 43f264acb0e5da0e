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
from typing import Iterable, Sequence

import torch
from torch import nn

from ..data.encoding import Batch
from ..curvature.fit import compute_dtype
from ..curvature.hooks import stream_batch
from ..models.adapters import TrackedModule


@dataclass
class LowRank:
    """``U ≈ Σ_k x_k y_kᵀ`` per block, all blocks of a module side by side.

    ``X (Q, out, R)``: column ``k`` is zero outside its block's rows; ``Y (Q, in_dim, R)``. A candidate's
    score is then ``Σ_t Σ_k (s_tᵀ x_k)(y_kᵀ [a_t; 1])``.
    """

    X: torch.Tensor
    Y: torch.Tensor


def low_rank(U: dict[str, torch.Tensor], tms: list[TrackedModule], rank: int) -> dict[str, "LowRank | torch.Tensor"]:
    """Rank-``rank`` truncated SVD of every block of every query vector (module → :class:`LowRank`).

    A module whose factors would cost at least as much as the dense matrix (``R·(out+in) ≥ out·in``,
    e.g. per-head blocks with ``rank ≥ head_dim``) is kept dense: same speed, exact. Everything is made
    on ``U``'s own device.
    """
    if rank < 1:
        raise ValueError("rank must be ≥ 1")
    out = {}
    for tm in tms:
        if tm.name not in U:
            continue
        if not _factored(tm, rank):
            out[tm.name] = U[tm.name]
            continue
        Xs, Ys = [], []
        for blk in tm.blocks:
            Ub = U[tm.name][:, blk.rows, :]
            u, sv, vh = torch.linalg.svd(Ub, full_matrices=False)
            r = min(rank, sv.shape[-1])
            X = torch.zeros(Ub.shape[0], tm.out_features, r, dtype=Ub.dtype, device=Ub.device)
            X[:, blk.rows, :] = u[..., :r] * sv[..., None, :r]
            Xs.append(X)
            Ys.append(vh[..., :r, :].transpose(-1, -2))
        out[tm.name] = LowRank(torch.cat(Xs, -1), torch.cat(Ys, -1))
    return out


def _block_rank(tm: TrackedModule, rank: int) -> int:
    """Columns of a module's low-rank factors: ``Σ_blocks min(rank, out_b, in_dim)``."""
    return sum(min(rank, b.out_dim, tm.in_dim) for b in tm.blocks)


def _factored(tm: TrackedModule, rank: int) -> bool:
    return _block_rank(tm, rank) * (tm.out_features + tm.in_dim) < tm.out_features * tm.in_dim


def query_vector_elements(tms: list[TrackedModule], rank: int | None = None) -> int:
    """Elements of one query's vector over ``tms``: dense ``Σ out·in_dim``, or with :func:`low_rank`
    factors of ``rank`` (``R·(out+in_dim)`` per factored module)."""
    n = 0
    for tm in tms:
        dense = tm.out_features * tm.in_dim
        n += _block_rank(tm, rank) * (tm.out_features + tm.in_dim) if rank is not None and _factored(tm, rank) else dense
    return n


def largest_rank(tms: list[TrackedModule], n_queries: int, budget_bytes: int, element_size: int) -> int | None:
    """The largest rank whose low-rank query vectors for ``n_queries`` fit in ``budget_bytes`` (None: not even rank 1)."""
    fits = lambda r: n_queries * query_vector_elements(tms, r) * element_size <= budget_bytes  # noqa: E731
    hi = max(max(tm.out_features, tm.in_dim) for tm in tms)
    if not fits(1):
        return None
    lo = 1  # fits(lo) holds; the element count grows with the rank until every module is dense
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


@dataclass
class ScoreResult:
    """Scores of ``N`` candidates for ``Q`` queries.

    ``scores (Q, N)``; ``per_module (Q, N, M)`` over ``modules`` (names, in order; None when scored
    with subsets); ``per_token`` (when
    asked) a list over candidates of ``(Q, T_n)`` tensors; ``indices (N,)`` the candidates' dataset
    positions, in the order scored.
    """

    scores: torch.Tensor
    per_module: torch.Tensor | None
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


def _order(mode: str, Q: int, T: int) -> str:
    if mode != "auto":
        return mode
    return "direct" if Q * T <= T + Q else "grads"


def _split_bias(M: torch.Tensor, tm: TrackedModule):
    """``[W | b]`` along the last dim → ``(W, b)`` (``b`` None without bias)."""
    return (M[..., : tm.in_features], M[..., tm.in_features]) if tm.bias else (M, None)


@torch.no_grad()
def _contract(a: torch.Tensor, s: torch.Tensor, U, tm: TrackedModule, order: str, want_tokens: bool):
    """Scores ``(Q, B)`` and optionally per-token ``(Q, B, T)`` for one module.

    ``a (B, T, in_features)`` has no column of ones: the bias part of ``U`` is handled analytically.
    """
    if isinstance(U, LowRank):
        Yw, Yb = _split_bias(U.Y.transpose(-1, -2), tm)  # (Q, R, in), (Q, R)
        sx = torch.einsum("bto,qor->qbtr", s, U.X)
        ay = torch.einsum("bti,qri->qbtr", a, Yw)
        if Yb is not None:
            ay = ay + Yb[:, None, None, :]
        tok = (sx * ay).sum(-1)
        return tok.sum(-1), (tok if want_tokens else None)
    Uw, Ub = U.W, U.b
    if order == "direct" or want_tokens:
        if Uw.shape[0] == 1:
            x = torch.nn.functional.linear(a, Uw[0], None if Ub is None else Ub[0])  # (B, T, out)
            tok = (x * s).sum(-1).unsqueeze(0)
        else:
            x = torch.einsum("bti,qoi->qbto", a, Uw)
            if Ub is not None:
                x = x + Ub[:, None, None, :]
            tok = (x * s).sum(-1)
        return tok.sum(-1), (tok if want_tokens else None)
    B = a.shape[0]
    step = max(1, _GRAD_CHUNK // (tm.out_features * tm.in_dim))
    Uw2 = U.W2
    parts = []
    for i in range(0, B, step):
        si = s[i : i + step]
        g = torch.bmm(si.transpose(1, 2), a[i : i + step])  # (b, out, in): per-candidate gradients
        sc = g.reshape(g.shape[0], -1) @ Uw2.T  # (b, Q)
        if Ub is not None:
            sc = sc + si.sum(1) @ Ub.T
        parts.append(sc.T)
    return torch.cat(parts, 1), None


@torch.no_grad()
def _contract_subsets(a: torch.Tensor, s: torch.Tensor, U: "Split", tm: TrackedModule, plan: list) -> torch.Tensor:
    """Scores ``(Q, B)`` of one module for the (query rows, batch positions) pairs of ``plan`` alone
    (NaN elsewhere): per-candidate gradients are formed once and each group of query rows is
    contracted with the candidates it asked for only."""
    B = a.shape[0]
    out = torch.full((U.W.shape[0], B), float("nan"), dtype=torch.float64, device=a.device)
    step = max(1, _GRAD_CHUNK // (tm.out_features * tm.in_dim))
    for i in range(0, B, step):
        si = s[i : i + step]
        g = torch.bmm(si.transpose(1, 2), a[i : i + step]).reshape(si.shape[0], -1)  # (b, out·in)
        sb = si.sum(1) if U.b is not None else None
        for rows, pos in plan:
            p = pos[(pos >= i) & (pos < i + step)]
            if p.numel() == 0:
                continue
            sc = g[p - i] @ U.W2[rows].T  # (n, R)
            if sb is not None:
                sc = sc + sb[p - i] @ U.b[rows].T
            out[rows if isinstance(rows, slice) else rows.unsqueeze(-1), p] = sc.T.double()
    return out


def _subset_plan(groups: list, batch: Batch) -> list:
    """Per group ``(query rows, its wanted dataset indices, sorted)``: the batch positions it wants."""
    idx = batch.indices.to("cpu")
    plan = []
    for rows, wanted in groups:
        pos = torch.nonzero(torch.isin(idx, wanted)).flatten()
        if pos.numel():
            plan.append((rows, pos.to(batch.input_ids.device)))
    return plan


def subset_groups(subsets: Sequence[Sequence[int]]) -> list:
    """Query rows grouped by identical candidate sets: ``[(rows, sorted int64 tensor of the set)]`` (memory
    of the sets themselves, not of the corpus); rows are a slice when the group's rows are contiguous
    (no copy of their query vectors)."""
    by_set: dict[tuple, list[int]] = {}
    for q, sub in enumerate(subsets):
        by_set.setdefault(tuple(sorted({int(i) for i in sub})), []).append(q)
    out = []
    for key, qs in by_set.items():
        rows = slice(qs[0], qs[-1] + 1) if qs == list(range(qs[0], qs[-1] + 1)) else torch.tensor(qs)
        out.append((rows, torch.tensor(key, dtype=torch.int64)))
    return out


@dataclass
class Split:
    """A query matrix split once into its weight part ``W (Q, out, in)`` (contiguous, also flattened
    to ``W2 (Q, out·in)``) and bias column ``b (Q, out)``, so the contraction never copies per batch.
    :func:`score_batches` accepts it in place of the ``(Q, out, in_dim)`` matrix."""

    W: torch.Tensor
    W2: torch.Tensor
    b: torch.Tensor | None

    @classmethod
    def empty(cls, n_queries: int, tm: TrackedModule, dtype, device) -> "Split":
        W = torch.empty(n_queries, tm.out_features, tm.in_features, dtype=dtype, device=device)
        b = torch.empty(n_queries, tm.out_features, dtype=dtype, device=device) if tm.bias else None
        return cls(W, W.view(n_queries, -1), b)

    def dense(self) -> torch.Tensor:
        """The ``(Q, out, in_dim)`` matrix ``[W | b]`` (a new tensor)."""
        return self.W.clone() if self.b is None else torch.cat([self.W, self.b.unsqueeze(-1)], -1)

    def rows(self, i: int, j: int) -> "Split":
        return Split(self.W[i:j], self.W2[i:j], None if self.b is None else self.b[i:j])


def _prepare(U, tm: TrackedModule, dtype):
    if isinstance(U, LowRank):
        return LowRank(U.X.to(dtype).contiguous(), U.Y.to(dtype).contiguous())
    if isinstance(U, Split):
        if U.W.dtype == dtype:
            return U
        W = U.W.to(dtype)
        return Split(W, W.view(W.shape[0], -1), None if U.b is None else U.b.to(dtype))
    W, b = _split_bias(U.to(dtype), tm)
    W = W.contiguous()
    return Split(W, W.reshape(W.shape[0], -1), None if b is None else b.contiguous())


def _n_queries(u) -> int:
    return u.X.shape[0] if isinstance(u, LowRank) else u.W.shape[0] if isinstance(u, Split) else u.shape[0]


def contraction_dtype(model: nn.Module) -> torch.dtype:
    """Dtype of the contractions: the model's, at least float32 (a bf16 / fp16 model's ``a`` and ``s``
    are cast one module at a time)."""
    return compute_dtype(next(model.parameters()).dtype)


def score_batches(
    model: nn.Module,
    tms: list[TrackedModule],
    U: dict[str, torch.Tensor | LowRank],
    batches: Iterable[Batch],
    objective: str = "lm",
    order: str = "auto",
    per_token: bool = False,
    progress=None,
    subsets: Sequence[Sequence[int]] | None = None,
) -> ScoreResult:
    """Score every candidate of ``batches`` (forward + activation-only backward on ``model``) against
    the query vectors ``U`` (module → ``(Q, out, in_dim)``, :class:`Split` or :class:`LowRank`).

    Only modules present in ``U`` are contracted; the candidate loss is ``objective`` with data labels.
    Each module is contracted as soon as its output gradient exists (all modules' ``s`` are never held
    at once), and for a registered causal LM the head's gradient is formed in closed form (no
    ``(B, T, V)`` logits; :func:`msif.curvature.hooks.stream_batch`).

    ``subsets``: per query row, the dataset indices (``batch.indices``) it wants scored; only those
    pairs are contracted (rows with the same set share the work) and every other score is NaN. Dense
    :class:`Split` / tensor query vectors only, no ``per_token``.
    """
    names = [tm.name for tm in tms if tm.name in U]
    if not names:
        raise ValueError("no tracked module of the model has a query vector")
    tmap = {tm.name: tm for tm in tms}
    sub = [tmap[n] for n in names]
    Q = _n_queries(U[names[0]])
    dtype = contraction_dtype(model)
    U = {n: _prepare(U[n], tmap[n], dtype) for n in names}  # once, not per batch
    if subsets is not None:
        if per_token or any(isinstance(u, LowRank) for u in U.values()):
            raise ValueError("subsets score dense query vectors without per-token scores")
        if len(subsets) != Q:
            raise ValueError(f"give one subset per query row ({Q}), not {len(subsets)}")
        groups = subset_groups(subsets)
    totals, modules, idx, toks = [], [], [], []
    for batch in batches:
        T = batch.input_ids.shape[1]
        got: dict[str, tuple] = {}
        plan = _subset_plan(groups, batch) if subsets is not None else None

        def contract(n, a, s):
            if plan is not None:
                got[n] = (_contract_subsets(a.to(dtype), s.to(dtype), U[n], tmap[n], plan), None)
            else:
                got[n] = _contract(a.to(dtype), s.to(dtype), U[n], tmap[n], _order(order, Q, T), per_token)

        inputs: dict[str, torch.Tensor] = {}  # a module's input, held until its output gradient exists
        stream_batch(model, sub, batch, objective, "empirical", 0, 0,
                     lambda tm, a: inputs.__setitem__(tm.name, a), lambda tm, s: contract(tm.name, inputs.pop(tm.name), s))
        inputs.clear()
        zero = torch.zeros(Q, batch.size, dtype=torch.float64, device=batch.input_ids.device)
        pm = torch.stack([got[n][0].double() if n in got else zero for n in names], -1)  # (Q, B, M)
        totals.append(pm.sum(-1))
        if subsets is None:  # with subsets (many rows, sparse pairs) only the totals are kept
            modules.append(pm)
        del pm
        idx.append(batch.indices)
        if per_token:
            tok_sum = sum(got[n][1].double() for n in names if n in got)
            lens = batch.attention_mask.sum(1).tolist()
            toks.extend(tok_sum[:, i, : lens[i]] for i in range(batch.size))
        if progress is not None:
            progress(batch.size)
    if not totals:
        raise ValueError("no candidates to score")
    return ScoreResult(
        scores=torch.cat(totals, 1),
        per_module=torch.cat(modules, 1) if modules else None,
        modules=names,
        indices=torch.cat(idx),
        per_token=toks if per_token else None,
        roles=[tmap[n].role for n in names],
    )

