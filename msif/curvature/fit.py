"""Fitting curvature factors: covariance pass → float64 eigendecomposition → eigenvalue-correction pass.

Every pass is a forward and an activation-only backward of the model (no parameter gradients) with
hooks on the tracked layers. The statistics are consumed inside the hooks, module by module: a
module's input ``a`` is summed (covariance pass) or kept only until its own output gradient ``s``
arrives in the backward (eigenvalue and refinement passes), so the memory of a fit is the model,
the factor sums, autograd's own activations for one batch, the tracked layers' inputs, and one
module's per-example work. Statistics are sums with counts (tokens and sequences actually seen), so
partial runs merge by addition (:meth:`FactorSet.merge_`), and a killed fit resumes from its last
checkpoint to the same factors (:mod:`msif.curvature.checkpoint`).

Precision: activations of a bfloat16 / float16 model are cast to float32 one module at a time before
any product; sums are float32 by default (float64 for a float64 model, or when asked); the
eigendecomposition is always float64; eigenvectors are stored in ``factor_dtype`` (the same rule).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.encoding import Batch
from ..distributed import broadcast_object, broadcast_tensors, reduce_sums, split_by_cost, world
from ..models.adapters import tracked_modules
from ..objectives import check_objective
from . import checkpoint as ckpt
from .factors import STRATEGIES, BlockStats, FactorError, FactorSet
from .hooks import stream_batch

DTYPES = ("auto", "float32", "float64")


@dataclass
class FitConfig:
    """Settings of a factor fit (stored with the factors)."""

    objective: str = "lm"  # lm | answer | classification
    strategy: str = "ekfac"  # ekfac | kfac | diagonal | identity
    modules: str = "all"  # all | mlp | attention
    per_head: bool = True  # Q/K/V of each head as separate blocks
    labels: str = "sampled"  # sampled (true Fisher = GGN) | empirical (data labels)
    seed: int = 0
    max_examples: int | None = None
    batch_size: int = 8
    stats_dtype: str = "auto"  # sums: float32 | float64 | auto (float64 only for a float64 model)
    generic: bool = False  # track every backbone linear of an unregistered architecture
    samples: int = 1  # label draws per example (sampled labels): more draws, less Monte-Carlo noise
    refine: int = 0  # EK-FAC: passes refining A and S towards the nearest Kronecker product of each GGN block
    factor_dtype: str = "auto"  # stored eigenvectors/eigenvalues: float32 | float64 | auto (as stats_dtype)

    def validate(self) -> "FitConfig":
        check_objective(self.objective)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, not {self.strategy!r}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be ≥ 1")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError("max_examples must be ≥ 1")
        if self.samples < 1:
            raise ValueError("samples must be ≥ 1")
        if self.refine < 0:
            raise ValueError("refine must be ≥ 0")
        for name in ("stats_dtype", "factor_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {DTYPES}, not {getattr(self, name)!r}")
        if self.refine > 0 and self.strategy != "ekfac":
            raise ValueError(
                "refine only applies to strategy 'ekfac' (its eigenvalues are refitted in the refined basis; "
                "K-FAC would also need the refined factors' scale)"
            )
        if self.samples > 1 and self.labels == "empirical":
            raise ValueError("samples > 1 only makes sense with sampled labels (the data labels are fixed)")
        return self

    def dtypes(self, model_dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
        """``(sums dtype, stored factor dtype)``: float32 unless asked, or the model is float64."""
        auto = torch.float64 if model_dtype == torch.float64 else torch.float32
        pick = lambda name: auto if name == "auto" else getattr(torch, name)  # noqa: E731
        return pick(self.stats_dtype), pick(self.factor_dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Products of activations are formed in float32 for half-precision models, else in their own dtype."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _batches(data: Iterable[Batch], max_examples: int | None) -> Iterator[Batch]:
    seen = 0
    for b in data:
        if max_examples is not None and seen + b.size > max_examples:
            keep = max_examples - seen
            if keep <= 0:
                return
            b = b.head(keep)
        seen += b.size
        yield b
        if max_examples is not None and seen >= max_examples:
            return


def _check_batch(batch: Batch, objective: str):
    if objective == "classification":
        if batch.labels is None:
            raise ValueError("the classification objective needs a label for every example")
    elif not bool(batch.target_mask.any()):
        raise ValueError(
            f"examples {batch.indices.tolist()} have no token that counts in the {objective!r} loss "
            "(empty answers, or one-token documents)"
        )


# ---------------------------------------------------------------------------------------------------
# the passes: each consumes (a, s) of one module at a time and adds into its sums ``acc``
# ---------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------------


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


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else torch.float32


def fit_factors(
    model: nn.Module,
    data: Iterable[Batch] | list[Batch],
    config: FitConfig | None = None,
    progress: bool = False,
    model_name: str | None = None,
    fingerprint: str | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 100,
    total: int | None = None,
) -> FactorSet:
    """Fit curvature factors of ``model`` on ``data`` (an iterable of batches, iterated once per pass).

    ``data`` must be re-iterable (a list, or an object whose ``__iter__`` restarts) and give the same
    batches on every pass; batches are moved to the model's device. With ``checkpoint`` (a folder),
    the partial sums are written there atomically every ``checkpoint_every`` batches and at the end
    of each pass, and a fit that finds a checkpoint of the same model, settings and data resumes from
    it (:class:`msif.curvature.checkpoint.ResumeError` if anything differs); the caller deletes the
    folder once the factors are saved. ``total``: examples per pass, for the progress bars' ETA.
    Returns an eigendecomposed :class:`FactorSet`; :meth:`FactorSet.save` writes it.
    """
    cfg = (config or FitConfig()).validate()
    if checkpoint_every < 1:
        raise ValueError("checkpoint_every must be ≥ 1")
    tms = tracked_modules(model, per_head=cfg.per_head, modules=cfg.modules, generic=cfg.generic)
    sdt, fdt = cfg.dtypes(_model_dtype(model))
    device = _model_device(model)
    fs = FactorSet(strategy=cfg.strategy, modules={tm.name: tm for tm in tms},
                   blocks={b.name: b for tm in tms for b in tm.blocks})
    if fingerprint is None:
        from ..models.loading import model_fingerprint  # lazy: loading imports transformers auto classes

        fingerprint = model_fingerprint(model, tms)
    dt_name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
    fs.meta.update(
        config=asdict(cfg), fingerprint=fingerprint,
        model_name=model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__,
        model_type=getattr(getattr(model, "config", None), "model_type", None), model_class=type(model).__name__,
        objective=cfg.objective, labels=cfg.labels, per_head=cfg.per_head, module_subset=cfg.modules,
        stats_dtype=dt_name(sdt), model_dtype=dt_name(_model_dtype(model)), timings={},
    )
    identity = dict(config=asdict(cfg), fingerprint=fingerprint, blocks=list(fs.blocks), stats_dtype=dt_name(sdt),
                    factor_dtype=dt_name(fdt))
    path = Path(checkpoint) if checkpoint is not None else None
    w = world()
    progress = progress and w.main
    state = _resume(path, identity, fs, device)
    if state.stage or state.batches:
        fs.meta["resumed"] = True
        if progress:
            print(f"resuming the fit from {path} ({_stages(cfg)[state.stage] if state.stage < len(_stages(cfg)) else 'done'}, "
                  f"{state.batches} batches done)", flush=True)
    fs.meta["timings"].update(state.timings)
    was_training = model.training
    model.eval()
    try:
        stages = _stages(cfg)
        for si in range(state.stage, len(stages)):
            p = _make_pass(stages[si], fs, tms, cfg, sdt)
            if si == state.stage:
                p.acc, p.counts = state.acc, dict(state.counts) or p.counts
            t0 = time.perf_counter()
            _run_pass(model, tms, data, cfg, p, state, path, identity, checkpoint_every, progress, total, device)
            reduce_sums(p.acc, p.counts, f"summing the {p.name} over the ranks")
            p.finish()
            key = stages[si].split(":")[0]
            _time(fs, f"{key}_s", time.perf_counter() - t0)
            if stages[si] != "lambda":
                t0 = time.perf_counter()
                _eigendecompose(fs, fdt)
                _time(fs, "eigendecomposition_s", time.perf_counter() - t0)
            state = ckpt.PassState(stage=si + 1, data_digest=state.data_digest, timings=dict(fs.meta["timings"]))
            if path is not None and si + 1 < len(stages) and w.main:
                ckpt.save(path, identity, fs, state)
        if w.active:
            fs.meta["world_size"] = w.size
    finally:
        model.train(was_training)
    return fs


def _resume(path: Path | None, identity: dict, fs: FactorSet, device) -> ckpt.PassState:
    """The checkpoint's state (a fresh one without a checkpoint). With several ranks, rank 0 reads it
    and sends the finished stages' tensors and the state to the others (their own partial sums start
    empty: rank 0 holds the sums of every batch done, see :func:`_save`), so the nodes need not share
    a file system and a resume may use another number of ranks."""
    w = world()
    if not w.active:
        return (ckpt.load(path, identity, fs, device) if path is not None else None) or ckpt.PassState()
    err, state = None, None
    if w.main and path is not None:
        try:
            state = ckpt.load(path, identity, fs, device)
        except ckpt.ResumeError as e:
            err = str(e)
    keys = [(k, tuple(x.shape), x.dtype) for k, x in fs._tensors(cpu=False).items()] if w.main else None
    head = broadcast_object((err, None if state is None else replace(state, acc={}), keys,
                             (fs.n_tokens, fs.n_examples_cov, fs.n_examples_lambda)), "reading the fit's checkpoint")
    err, shared, keys, fs_counts = head
    if err:
        raise ckpt.ResumeError(err)
    if shared is None:
        return ckpt.PassState()
    if not w.main:
        for k, shape, dt in keys:
            fs.set_tensor(k, torch.empty(shape, dtype=dt, device=device))
        fs.n_tokens, fs.n_examples_cov, fs.n_examples_lambda = fs_counts
        state = replace(shared, acc={}, counts={k: 0 for k in shared.counts})
    tensors = fs._tensors(cpu=False)
    for dt in sorted({dt for _, _, dt in keys}, key=str):
        broadcast_tensors([tensors[k] for k, _, d in keys if d == dt], "sending the checkpoint's factors")
    return state


def _save(path: Path, identity: dict, p: _Pass, st: ckpt.PassState) -> None:
    """Checkpoint the running pass: with several ranks, the partial sums are first summed onto rank 0
    (which writes) and emptied on the others, so the checkpoint holds every batch done so far."""
    w = world()
    reduce_sums(p.acc, p.counts, f"collecting the {p.name}'s sums for a checkpoint", to_main=True)
    if w.main:
        ckpt.save(path, identity, p.fs, st)


def _eigendecompose(fs: FactorSet, fdt) -> None:
    """:meth:`FactorSet.eigendecompose`, with several ranks split by cost (``d³``) and broadcast."""
    w = world()
    if not w.active:
        fs.eigendecompose(fdt)
        return
    mats = fs.eigen_inputs()
    keys = sorted(mats)
    owner = split_by_cost([float(mats[k].shape[-1]) ** 3 for k in keys], w.size)
    fs.eigendecompose(fdt, keys=[k for k, o in zip(keys, owner) if o == w.rank])
    for r in range(w.size):
        theirs = [k for k, o in zip(keys, owner) if o == r]
        if r != w.rank:
            for k in theirs:
                d = mats[k].shape[-1]
                dt = fdt or mats[k].dtype
                fs.set_eigen(k, torch.empty(d, dtype=dt, device=mats[k].device),
                             torch.empty(d, d, dtype=dt, device=mats[k].device))
        out = [t for k in theirs for t in fs.eigen(k)]
        broadcast_tensors(out, f"sending rank {r}'s eigendecompositions", src=r)


def _time(fs: FactorSet, key: str, dt: float) -> None:
    fs.meta["timings"][key] = fs.meta["timings"].get(key, 0.0) + dt


def _run_pass(model, tms, data, cfg: FitConfig, p: _Pass, state: ckpt.PassState, path, identity, every: int,
              progress: bool, total: int | None, device) -> None:
    """One pass of ``p`` over the batches, skipping the ``state.batches`` already summed (their digest
    checked), with a checkpoint every ``every`` batches."""
    skip, digest = state.batches, ""
    w = world()
    # FSDP: every forward all-gathers weights from every rank, so the ranks must run in rounds of one batch
    # each, with checkpoints (collectives of their own) only between rounds
    sharded = getattr(model, "_msif_head_unit", None) is not None and w.active
    bar = tqdm(desc=p.name, unit="ex", total=cfg.max_examples or total, disable=not progress)
    n, last_save, batch = 0, skip, None
    for n, batch in enumerate(_batches(data, cfg.max_examples), 1):
        digest = ckpt.chain_digest(digest, batch)
        if n <= skip:
            if n == skip and digest != state.digest:
                raise ckpt.ResumeError(
                    f"the data differ from those of the interrupted fit in {path} (the first {skip} batches do not "
                    "match): rerun with the same data and settings, or pass --restart to discard the checkpoint"
                )
            bar.update(batch.size)
            continue
        _check_batch(batch, cfg.objective)  # on every rank: a bad batch stops all of them at once
        if w.mine(n - 1 - skip):  # in turn from where this pass (re)starts: the split depends on the batch index only
            batch = batch.to(device)
            for k in range(cfg.samples):
                stream = p.stream + 2 * k
                p.begin_draw(batch)
                stream_batch(model, tms, batch, cfg.objective, cfg.labels, cfg.seed, stream, p.on_input, p.on_grad)
                p.end_draw(batch)
        bar.update(batch.size)
        due = n % every == 0 if not sharded else ((n - skip) % w.size == 0 and n - last_save >= every)
        if path is not None and due:
            _save(path, identity, p, ckpt.PassState(state.stage, n, p.acc, p.counts, digest, state.data_digest,
                                                    dict(p.fs.meta["timings"])))
            last_save = n
    short = (n - skip) % w.size
    if sharded and short and w.rank >= short and batch is not None:
        # the last round is short: this rank's forward/backward still has to take part in the all-gathers
        stream_batch(model, tms, batch.to(device), cfg.objective, cfg.labels, cfg.seed, p.stream,
                     lambda tm, a: None, lambda tm, s: None)
    bar.close()
    if n < skip:
        raise ckpt.ResumeError(f"the data are shorter than those of the interrupted fit in {path}; rerun with the same "
                               "data, or pass --restart to discard the checkpoint")
    if not state.data_digest:
        state.data_digest = digest
    elif digest != state.data_digest:
        raise FactorError(
            "the data gave other batches on this pass than on the first one: fitting needs a re-iterable dataset "
            "that yields the same batches every time (a list, or msif.data.examples.ExampleBatches)"
        )
