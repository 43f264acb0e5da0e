"""The passes of a factor fit: each consumes one module's ``(a, s)`` at a time and adds into its sums.

* :class:`_CovariancePass` — ``Σ a aᵀ`` per module and ``Σ s sᵀ`` per block (K-FAC's factors).
* :class:`_RefinePass` — one alternating-least-squares step of ``A`` and ``S`` towards the nearest
  Kronecker product of every GGN block (EK-FAC with ``refine``).
* :class:`_LambdaPass` — squared per-sequence gradients in the eigenbasis (EK-FAC's eigenvalues) or
  not (diagonal).

:func:`_stages` lists the passes a strategy needs and :func:`_make_pass` builds one;
:func:`msif.curvature.fit.fit_factors` runs them over the data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..data.encoding import Batch
from .factors import BlockStats, FactorSet

if TYPE_CHECKING:
    from .fit import FitConfig


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Products of activations are formed in float32 for half-precision models, else in their own dtype."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class _Pass:
    """A pass over the data: ``on_input`` / ``on_grad`` per module, ``end_draw`` per forward/backward,
    ``finish`` turns the sums into factors. ``acc`` and ``counts`` are all its state (checkpointed)."""

    name = "pass"
    stream = 0

    def __init__(self, fs: FactorSet, tms, cfg: FitConfig, sdt: torch.dtype):
        self.fs, self.tms, self.cfg, self.sdt = fs, tms, cfg, sdt
        self.acc: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {"examples": 0, "tokens": 0}
        self.held: dict[str, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None

    def _add(self, key: str, x: torch.Tensor) -> None:
        """``acc[key] += x`` in place (``x``: a new tensor of the caller's, kept as the sum the first time)."""
        x = x.to(self.sdt)
        if key in self.acc:
            self.acc[key].add_(x)
        else:
            self.acc[key] = x

    def begin_draw(self, batch: Batch) -> None:
        self.mask = batch.attention_mask.bool()

    def end_draw(self, batch: Batch) -> None:
        self.held.clear()  # modules without a gradient (not on the loss's path) contribute nothing
        self.counts["examples"] += batch.size
        self.counts["tokens"] += int(self.mask.sum())

    def on_input(self, tm, a):  # pragma: no cover - abstract
        raise NotImplementedError

    def on_grad(self, tm, s):  # pragma: no cover - abstract
        raise NotImplementedError

    def finish(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def _with_ones(tm, a: torch.Tensor) -> torch.Tensor:
    """``[a | 1]`` for a layer with a bias (the input of its ``[W | b]`` matrix), else ``a``."""
    return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1) if tm.bias else a


class _CovariancePass(_Pass):
    """Sums of ``a aᵀ`` per module and ``s sᵀ`` per block over non-padding tokens.

    The bias column of ``[a | 1]`` enters analytically (``Σ a`` and the token count), and ``s`` needs
    no mask (it is exactly zero at padding), so no copy of the activations is made without padding."""

    name, stream = "covariance pass", 0

    def begin_draw(self, batch: Batch) -> None:
        super().begin_draw(batch)
        self.all_real = bool(self.mask.all())

    def on_input(self, tm, a):
        a = a.to(compute_dtype(a.dtype))
        am = a.reshape(-1, a.shape[-1]) if self.all_real else a[self.mask]  # (n_tok, in_features)
        self._add_gram(f"A/{tm.name}", am)
        if tm.bias:
            self._add(f"a/{tm.name}", am.sum(0))

    def on_grad(self, tm, s):
        sm = s.to(compute_dtype(s.dtype)).reshape(-1, s.shape[-1])
        for blk in tm.blocks:
            self._add_gram(f"S/{blk.name}", sm[:, blk.rows])

    def _add_gram(self, key: str, x: torch.Tensor) -> None:
        """``acc[key] += xᵀ x`` for ``x (n, d)``, only its upper strips for wide ``x`` (see :func:`_gram_strips`);
        :meth:`finish` mirrors them."""
        step = _gram_strips(x.shape[1])
        if step is None:
            self._add(key, x.T @ x)
            return
        d = x.shape[1]
        acc = self.acc.get(key)
        if acc is None:
            acc = self.acc[key] = torch.zeros(d, d, dtype=self.sdt, device=x.device)
        for r in range(0, d, step):
            view = acc[r : r + step, r:]
            if acc.dtype == x.dtype:
                view.addmm_(x[:, r : r + step].T, x[:, r:])
            else:
                view += (x[:, r : r + step].T @ x[:, r:]).to(acc.dtype)

    def finish(self):
        fs = self.fs
        if self.counts["examples"] == 0:
            raise ValueError("the data gave no examples to fit on")
        for key, x in self.acc.items():
            if key[:2] in ("A/", "S/"):
                _mirror_strips(x)
        fs.A_sum = {tm.name: self._input_covariance(tm) for tm in self.tms}
        for tm in self.tms:
            for blk in tm.blocks:
                S = self.acc.get(f"S/{blk.name}")
                if S is None:  # a block whose output never received a gradient
                    S = torch.zeros(blk.out_dim, blk.out_dim, dtype=self.sdt, device=fs.A_sum[tm.name].device)
                fs.stats.setdefault(blk.name, BlockStats()).S_sum = S
        fs.n_tokens += self.counts["tokens"]
        fs.n_examples_cov += self.counts["examples"]

    def _input_covariance(self, tm) -> torch.Tensor:
        """``Σ [a | 1][a | 1]ᵀ`` from ``Σ a aᵀ``, ``Σ a`` and the token count."""
        A = self.acc[f"A/{tm.name}"]
        if not tm.bias:
            return A
        col = self.acc[f"a/{tm.name}"]
        n = torch.tensor([float(self.counts["tokens"])], dtype=A.dtype, device=A.device)
        return torch.cat([torch.cat([A, col[:, None]], 1), torch.cat([col, n])[None]], 0)


def _gram_strips(d: int) -> int | None:
    """Rows per strip of a covariance ``xᵀ x`` of width ``d`` formed as its upper strips only
    (``x[:, r:r+step]ᵀ x[:, r:]``): 8 strips skip 7/16 of the products (measured here: 4.7 ms instead
    of 6.7 ms for 1024 tokens × 1024); ``None`` below 512 columns, where one product is as fast."""
    return None if d < 512 else -(-d // 8)


def gram_flops(n: int, d: int) -> float:
    """FLOPs of one ``xᵀ x`` of ``x (n, d)`` as the covariance pass forms it (upper strips for wide ``x``)."""
    step = _gram_strips(d)
    if step is None:
        return 2.0 * n * d * d
    return sum(2.0 * n * min(step, d - r) * (d - r) for r in range(0, d, step))


def _mirror_strips(x: torch.Tensor) -> None:
    """Fill the part of a ``(d, d)`` sum below the strips of :func:`_gram_strips` from the part above."""
    d = x.shape[0]
    step = _gram_strips(d)
    if step is None:
        return
    for r in range(0, d, step):
        x[r + step :, r : r + step] = x[r : r + step, r + step :].T


def _block_rotation(fs: FactorSet, tm, dtype):
    """The module's output rotation ``s ↦ s Q_S`` per block, as a function on ``(..., out)``.

    Equal-sized blocks (per-head Q/K/V) are rotated by one batched matmul over the stacked ``Q_S``
    ``(n_blocks, d, d)`` instead of a dense block-diagonal ``(out, out)`` matrix (n_blocks× fewer flops).
    """
    sizes = {b.out_dim for b in tm.blocks}
    ordered = all(b.row_start == i * b.out_dim for i, b in enumerate(tm.blocks))
    if len(tm.blocks) > 1 and len(sizes) == 1 and ordered:
        d = sizes.pop()
        Q = torch.stack([fs.QS[b.name].to(dtype) for b in tm.blocks])  # (n, d, d)

        def rotate(x):
            # one bmm over blocks of (tokens, d) @ (d, d): 5x faster than broadcasting (..., n, 1, d) @ (n, d, d)
            y = torch.bmm(x.reshape(-1, len(tm.blocks), d).transpose(0, 1), Q)  # (n, tokens, d)
            return y.transpose(0, 1).reshape(x.shape)

        return rotate
    first = fs.QS[tm.blocks[0].name]
    if len(tm.blocks) == 1:
        Q1 = first.to(dtype)  # no copy when the dtypes agree
        return lambda x: x @ Q1
    Qfull = torch.zeros(tm.out_features, tm.out_features, dtype=dtype, device=first.device)
    for blk in tm.blocks:
        Qfull[blk.rows, blk.rows] = fs.QS[blk.name].to(dtype)
    return lambda x: x @ Qfull


# per-example gradients of one module are formed in chunks of at most this many elements
_CHUNK_ELEMS = 1 << 26


def _sequence_grads(am: torch.Tensor, sm: torch.Tensor, out_features: int, in_dim: int):
    """Per-sequence gradients ``Σ_t s_t a_tᵀ`` ``(b, out, in_dim)`` in chunks of the batch."""
    step = max(1, _CHUNK_ELEMS // (out_features * in_dim))
    for i in range(0, am.shape[0], step):
        yield torch.einsum("bto,bti->boi", sm[i : i + step], am[i : i + step])


class _LambdaPass(_Pass):
    """Sums over sequences of the squared per-sequence gradient, rotated into the eigenbasis (EK-FAC)
    or not (diagonal). A module's rotated input is held from its forward hook to its backward hook."""

    stream = 1

    def __init__(self, *args):
        super().__init__(*args)
        self.name = "eigenvalue-correction pass" if self.cfg.strategy == "ekfac" else "diagonal pass"
        self.rot: dict[str, tuple] = {}

    def _rotations(self, tm, dtype):
        if tm.name not in self.rot:
            self.rot[tm.name] = (self.fs.QA[tm.name].to(dtype), _block_rotation(self.fs, tm, dtype))
        return self.rot[tm.name]

    def on_input(self, tm, a):
        a = a.to(compute_dtype(a.dtype))
        if self.cfg.strategy != "ekfac":
            self.held[tm.name] = _with_ones(tm, a)
            return
        QA = self._rotations(tm, a.dtype)[0]
        n = a.shape[-1]
        # [a | 1] Q_A = a Q_A[:n] + Q_A[n]: no copy of a with a column of ones
        if tm.bias:
            self.held[tm.name] = torch.addmm(QA[n], a.reshape(-1, n), QA[:n]).reshape(*a.shape[:-1], QA.shape[1])
        else:
            self.held[tm.name] = a @ QA

    def on_grad(self, tm, s):
        am = self.held.pop(tm.name)
        sm = s.to(am.dtype)
        if self.cfg.strategy == "ekfac":
            sm = self._rotations(tm, am.dtype)[1](sm)
        for g in _sequence_grads(am, sm, tm.out_features, tm.in_dim):
            self._add(f"L/{tm.name}", g.square_().sum(0))

    def finish(self):
        fs = self.fs
        if self.counts["examples"] == 0:
            raise ValueError("the data gave no examples to fit on")
        for tm in self.tms:
            lam = self.acc.get(f"L/{tm.name}")
            for blk in tm.blocks:
                x = (torch.zeros(blk.out_dim, tm.in_dim, dtype=self.sdt, device=fs.device) if lam is None
                     else lam[blk.rows].clone())
                st = fs.stats.setdefault(blk.name, BlockStats())
                st.lambda_sum = x if st.lambda_sum is None else st.lambda_sum + x
        fs.n_examples_lambda += self.counts["examples"]


# which form of the refinement products a module uses: None = the cheaper one by flop count
_REFINE_FORM: str | None = None


def _token_space_cheaper(tm, T: int) -> bool:
    """Flop estimate of the two equal forms of ``E[DW A DWᵀ]`` and ``Σ_b E[DW_bᵀ S_b DW_b]`` per sequence:
    through the ``(out, in_dim)`` gradient ``DW`` or through ``T × T`` token products."""
    if _REFINE_FORM is not None:
        return _REFINE_FORM == "tokens"
    n, o = tm.in_dim, tm.out_features
    so2 = sum(b.out_dim ** 2 for b in tm.blocks)
    grad_form = T * o * n + 2 * (o * n * n + so2 * n)
    token_form = 2 * (T * n * n + T * T * n + T * T * o) + 2 * T * so2
    return token_form < grad_form


class _RefinePass(_Pass):
    """One alternating-least-squares step towards the nearest Kronecker product of every GGN block.

    A block of the GGN is ``G_b = E_n[vec(DW_n) vec(DW_n)ᵀ]`` with ``DW_n = Σ_t s_t a_tᵀ`` the
    per-sequence (pseudo-)gradient. The ``S_b ⊗ A`` closest to it in Frobenius norm (Van Loan and
    Pitsianis; the Kronecker-product SVD of Koroko et al., 2022), with ``A`` shared by the module's
    blocks, satisfies ``S_b ∝ E[DW_b A DW_bᵀ]`` and ``A ∝ Σ_b E[DW_bᵀ S_b DW_b]``; starting from the
    token covariances, each pass applies both updates (from the current ``A`` and ``S_b``). The token
    covariances ignore products between tokens of a sequence and the coupling of ``a`` and ``s``; the
    refined factors account for both, so their eigenbasis diagonalises each block better and EK-FAC's
    refitted eigenvalues capture more of it. The sums are rescaled to the traces they had, so only the
    eigenbases change; the eigenvalues EK-FAC uses come from the pass that follows. Sums in float64.
    """

    def __init__(self, fs, tms, cfg, sdt, j: int):
        super().__init__(fs, tms, cfg, torch.float64)
        self.name = f"basis refinement pass {j + 1}"
        self.stream = 2 * (j + 1) * max(cfg.samples, 1) + 2
        self.cast: dict[str, tuple] = {}

    def _current(self, tm, dtype):
        if tm.name not in self.cast:
            fs = self.fs
            A = (fs.A_sum[tm.name].double() / fs.n_tokens).to(dtype)
            S = {b.name: (fs.stats[b.name].S_sum.double() / fs.n_tokens).to(dtype) for b in tm.blocks}
            self.cast[tm.name] = (A, S)
        return self.cast[tm.name]

    def on_input(self, tm, a):
        self.held[tm.name] = _with_ones(tm, a.to(compute_dtype(a.dtype)))

    def on_grad(self, tm, s):
        am = self.held.pop(tm.name)
        sm = s.to(am.dtype)
        A, Sb = self._current(tm, am.dtype)
        if _token_space_cheaper(tm, am.shape[1]):
            self._token_space(am, sm, tm, A, Sb)
            return
        for g in _sequence_grads(am, sm, tm.out_features, tm.in_dim):
            for blk in tm.blocks:
                gb = g[:, blk.rows, :]
                self._add(f"S/{blk.name}", torch.einsum("boi,bpi->op", gb @ A, gb))
                self._add(f"A/{tm.name}", torch.einsum("boi,boj->ij", Sb[blk.name] @ gb, gb))

    def _token_space(self, am, sm, tm, A, Sb):
        """The refinement sums without forming ``DW``: with ``DW = sᵀ a`` (``s (T, out)``, ``a (T, in_dim)``),
        ``DW_b A DW_bᵀ = s_bᵀ (a A aᵀ) s_b`` and ``DW_bᵀ S_b DW_b = aᵀ (s_b S_b s_bᵀ) a``. Padding needs no
        mask: ``s`` is zero there."""
        K = (am @ A) @ am.transpose(1, 2)  # (B, T, T)
        M = None
        for blk in tm.blocks:
            s_b = sm[..., blk.rows]  # (B, T, o_b)
            o = s_b.shape[-1]
            self._add(f"S/{blk.name}", s_b.reshape(-1, o).T @ (K @ s_b).reshape(-1, o))
            Mb = (s_b @ Sb[blk.name]) @ s_b.transpose(1, 2)
            M = Mb if M is None else M + Mb
        n = am.shape[-1]
        self._add(f"A/{tm.name}", am.reshape(-1, n).T @ (M @ am).reshape(-1, n))

    def finish(self):
        fs = self.fs
        for tm in self.tms:
            A = self.acc.get(f"A/{tm.name}")
            if A is not None:
                fs.A_sum[tm.name] = _rescaled(A, fs.A_sum[tm.name])
            for blk in tm.blocks:
                S = self.acc.get(f"S/{blk.name}")
                if S is not None:
                    st = fs.stats[blk.name]
                    st.S_sum = _rescaled(S, st.S_sum)


def _rescaled(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` symmetrised and scaled to ``old``'s trace, in ``old``'s dtype; ``old`` when ``new`` is zero
    (a module that saw no gradient keeps its token covariance)."""
    new = 0.5 * (new + new.T)
    tr = float(torch.trace(new))
    if not tr > 0:
        return old
    return (new * (float(torch.trace(old.double())) / tr)).to(old.dtype)


def _stages(cfg: FitConfig) -> list[str]:
    out = []
    if cfg.strategy in ("ekfac", "kfac"):
        out.append("covariance")
        out += [f"refine:{j}" for j in range(cfg.refine)]
    if cfg.strategy in ("ekfac", "diagonal"):
        out.append("lambda")
    return out


def _make_pass(stage: str, fs, tms, cfg, sdt) -> _Pass:
    if stage == "covariance":
        return _CovariancePass(fs, tms, cfg, sdt)
    if stage == "lambda":
        return _LambdaPass(fs, tms, cfg, sdt)
    return _RefinePass(fs, tms, cfg, sdt, int(stage.split(":")[1]))
