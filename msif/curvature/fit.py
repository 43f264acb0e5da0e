"""Fitting curvature factors: covariance pass → float64 eigendecomposition → eigenvalue-correction pass.

Every pass is a forward and an activation-only backward of the model (no parameter gradients) with
hooks on the tracked layers. Statistics are sums with counts (tokens and sequences actually seen), so
partial runs merge by addition (:meth:`FactorSet.merge_`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.encoding import Batch
from ..models.adapters import tracked_modules
from ..objectives import check_objective, curvature_targets, data_targets, model_logits, summed_loss
from .factors import STRATEGIES, BlockStats, FactorSet
from .hooks import Recorder


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
    stats_dtype: str = "float64"  # accumulation dtype of the sums
    generic: bool = False  # track every backbone linear of an unregistered architecture
    samples: int = 1  # label draws per example (sampled labels): more draws, less Monte-Carlo noise
    refine: int = 0  # EK-FAC: passes refining A and S towards the nearest Kronecker product of each GGN block

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
        if self.refine > 0 and self.strategy != "ekfac":
            raise ValueError(
                "refine only applies to strategy 'ekfac' (its eigenvalues are refitted in the refined basis; "
                "K-FAC would also need the refined factors' scale)"
            )
        if self.samples > 1 and self.labels == "empirical":
            raise ValueError("samples > 1 only makes sense with sampled labels (the data labels are fixed)")
        return self


def record_batch(model: nn.Module, tms, batch: Batch, targets_fn, append_ones: bool = True) -> tuple[dict, dict, torch.Tensor]:
    """One forward + activation-only backward with hooks.

    ``targets_fn(logits) -> targets`` gives the labels of the loss. Returns ``(a, s, logits)`` where
    ``a[module]`` is ``(B, T, in_dim)`` (``(B, T, in_features)`` with ``append_ones=False``) and
    ``s[module]`` is ``(B, T, out)``. With right padding and causal attention, ``s`` is exactly zero at
    padding positions (no loss there, and no real token sees them), so ``Σ_t s_t a_tᵀ`` needs no mask;
    ``a`` is *not* zeroed at padding (the covariance pass selects real tokens itself).
    """
    with Recorder(model, tms, append_ones=append_ones) as rec:
        logits = model_logits(model, batch)
        targets = targets_fn(logits)
        loss = summed_loss(logits, targets).sum()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                "the loss is NaN or infinite on a batch: check the model weights and the inputs (examples "
                f"{batch.indices.tolist()})"
            )
        s = rec.output_grads(loss)
        a = rec.inputs
    return a, s, logits.detach()


def per_example_grads(model: nn.Module, tms, batch: Batch, objective: str, targets=None) -> dict[str, torch.Tensor]:
    """Per-example gradients ``DW_n = Σ_t s_{n,t} a_{n,t}ᵀ``: module name → ``(B, out, in_dim)``.

    ``targets`` defaults to the data labels (the training loss / measurement ``m``).
    """
    fn = (lambda logits: data_targets(batch, objective)) if targets is None else (lambda logits: targets)
    a, s, _ = record_batch(model, tms, batch, fn)
    return {n: torch.einsum("bto,bti->boi", s[n], a[n]) for n in a}


def _batches(data: Iterable[Batch], max_examples: int | None) -> Iterator[Batch]:
    seen = 0
    for b in data:
        if max_examples is not None and seen + b.size > max_examples:
            keep = max_examples - seen
            if keep <= 0:
                return
            b = Batch(b.input_ids[:keep], b.attention_mask[:keep], b.target_mask[:keep],
                      None if b.labels is None else b.labels[:keep], b.indices[:keep])
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


def fit_factors(
    model: nn.Module,
    data: Iterable[Batch] | list[Batch],
    config: FitConfig | None = None,
    progress: bool = False,
    model_name: str | None = None,
    fingerprint: str | None = None,
) -> FactorSet:
    """Fit curvature factors of ``model`` on ``data`` (an iterable of batches, iterated once per pass).

    ``data`` must be re-iterable (a list, or an object whose ``__iter__`` restarts) for strategies with
    two passes (``ekfac``). Returns an eigendecomposed :class:`FactorSet`; :meth:`FactorSet.save` writes it.
    """
    cfg = (config or FitConfig()).validate()
    tms = tracked_modules(model, per_head=cfg.per_head, modules=cfg.modules, generic=cfg.generic)
    sdt = getattr(torch, cfg.stats_dtype)
    fs = FactorSet(
        strategy=cfg.strategy,
        modules={tm.name: tm for tm in tms},
        blocks={b.name: b for tm in tms for b in tm.blocks},
    )
    if fingerprint is None:
        from ..models.loading import model_fingerprint  # lazy: loading imports transformers auto classes

        fingerprint = model_fingerprint(model, tms)
    fs.meta.update(
        config=asdict(cfg),
        fingerprint=fingerprint,
        model_name=model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__,
        model_type=getattr(getattr(model, "config", None), "model_type", None),
        model_class=type(model).__name__,
        objective=cfg.objective,
        labels=cfg.labels,
        per_head=cfg.per_head,
        module_subset=cfg.modules,
        stats_dtype=cfg.stats_dtype,
        timings={},
    )
    was_training = model.training
    model.eval()
    try:
        if cfg.strategy in ("ekfac", "kfac"):
            t0 = time.perf_counter()
            _covariance_pass(model, tms, data, cfg, fs, sdt, progress)
            t1 = time.perf_counter()
            fs.eigendecompose()
            fs.meta["timings"]["covariance_s"] = t1 - t0
            fs.meta["timings"]["eigendecomposition_s"] = time.perf_counter() - t1
            if cfg.refine:
                t0 = time.perf_counter()
                for j in range(cfg.refine):
                    _refine_pass(model, tms, data, cfg, fs, progress, j)
                    fs.eigendecompose()
                fs.meta["timings"]["refine_s"] = time.perf_counter() - t0
        if cfg.strategy in ("ekfac", "diagonal"):
            t0 = time.perf_counter()
            _lambda_pass(model, tms, data, cfg, fs, sdt, progress)
            fs.meta["timings"]["lambda_s"] = time.perf_counter() - t0
    finally:
        model.train(was_training)
    return fs


def _draws(model, tms, batch: Batch, cfg: FitConfig, pass_: int):
    """``(a, s)`` of ``cfg.samples`` forward/backward passes of one batch, each with its own label draw
    (streams ``pass_``, ``pass_ + 2``, ... so that the two passes never share draws)."""
    for k in range(cfg.samples):
        stream = pass_ + 2 * k
        a, s, _ = record_batch(
            model, tms, batch,
            lambda logits: curvature_targets(logits, batch, cfg.objective, cfg.labels, cfg.seed, stream=stream),
        )
        yield a, s


def _covariance_pass(model, tms, data, cfg: FitConfig, fs: FactorSet, sdt, progress: bool):
    """Sums of ``a aᵀ`` per module and ``s sᵀ`` per block over non-padding tokens.

    Each batch's products are computed in the activations' dtype and added into ``sdt`` sums.
    """
    bar = tqdm(desc="covariance pass", unit="ex", total=cfg.max_examples, disable=not progress)
    for batch in _batches(data, cfg.max_examples):
        _check_batch(batch, cfg.objective)
        mask = batch.attention_mask.bool()
        for a, s in _draws(model, tms, batch, cfg, 0):
            for tm in tms:
                am = a[tm.name][mask]  # (n_tok, in_dim)
                A = (am.T @ am).to(sdt)
                fs.A_sum[tm.name] = fs.A_sum[tm.name] + A if tm.name in fs.A_sum else A
                sm = s[tm.name][mask]
                for blk in tm.blocks:
                    sb = sm[:, blk.rows]
                    S = (sb.T @ sb).to(sdt)
                    st = fs.stats.setdefault(blk.name, BlockStats())
                    st.S_sum = S if st.S_sum is None else st.S_sum + S
            fs.n_tokens += int(mask.sum())
            fs.n_examples_cov += batch.size
        bar.update(batch.size)
    bar.close()
    if fs.n_examples_cov == 0:
        raise ValueError("the data gave no examples to fit on")


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
            y = x.reshape(*x.shape[:-1], len(tm.blocks), d).unsqueeze(-2) @ Q  # (..., n, 1, d)
            return y.reshape(x.shape)

        return rotate
    Qfull = torch.zeros(tm.out_features, tm.out_features, dtype=dtype)
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


def _refine_token_space(am, sm, tm, A, Sb, A_new, S_new):
    """The refinement sums without forming ``DW``: with ``DW = sᵀ a`` (``s (T, out)``, ``a (T, in_dim)``),
    ``DW_b A DW_bᵀ = s_bᵀ (a A aᵀ) s_b`` and ``DW_bᵀ S_b DW_b = aᵀ (s_b S_b s_bᵀ) a``. Padding needs no
    mask: ``s`` is zero there."""
    K = (am @ A) @ am.transpose(1, 2)  # (B, T, T)
    M = None
    for blk in tm.blocks:
        s_b = sm[..., blk.rows]  # (B, T, o_b)
        o = s_b.shape[-1]
        S_new[blk.name] += (s_b.reshape(-1, o).T @ (K @ s_b).reshape(-1, o)).double()
        Mb = (s_b @ Sb[blk.name]) @ s_b.transpose(1, 2)
        M = Mb if M is None else M + Mb
    n = am.shape[-1]
    A_new[tm.name] += (am.reshape(-1, n).T @ (M @ am).reshape(-1, n)).double()


def _refine_pass(model, tms, data, cfg: FitConfig, fs: FactorSet, progress: bool, j: int):
    """One alternating-least-squares step towards the nearest Kronecker product of every GGN block.

    A block of the GGN is ``G_b = E_n[vec(DW_n) vec(DW_n)ᵀ]`` with ``DW_n = Σ_t s_t a_tᵀ`` the
    per-sequence (pseudo-)gradient. The ``S_b ⊗ A`` closest to it in Frobenius norm (Van Loan and
    Pitsianis; the Kronecker-product SVD of Koroko et al., 2022), with ``A`` shared by the module's
    blocks, satisfies ``S_b ∝ E[DW_b A DW_bᵀ]`` and ``A ∝ Σ_b E[DW_bᵀ S_b DW_b]``; starting from the
    token covariances, each pass applies both updates (from the current ``A`` and ``S_b``). The token
    covariances ignore products between tokens of a sequence and the coupling of ``a`` and ``s``; the
    refined factors account for both, so their eigenbasis diagonalises each block better and EK-FAC's
    refitted eigenvalues capture more of it. The sums are rescaled to the traces they had, so only the
    eigenbases change; the eigenvalues EK-FAC uses come from the pass that follows.
    """
    A_cur = {m: fs.A_sum[m].double() / fs.n_tokens for m in fs.A_sum}
    S_cur = {b: st.S_sum.double() / fs.n_tokens for b, st in fs.stats.items() if st.S_sum is not None}
    A_new = {m: torch.zeros_like(A) for m, A in A_cur.items()}
    S_new = {b: torch.zeros_like(S) for b, S in S_cur.items()}
    cast: dict[str, tuple] = {}
    bar = tqdm(desc=f"basis refinement pass {j + 1}", unit="ex", total=cfg.max_examples, disable=not progress)
    for batch in _batches(data, cfg.max_examples):
        _check_batch(batch, cfg.objective)
        for a, s in _draws(model, tms, batch, cfg, 2 * (j + 1) * max(cfg.samples, 1) + 2):
            for tm in tms:
                am, sm = a[tm.name], s[tm.name]
                if tm.name not in cast:
                    cast[tm.name] = (A_cur[tm.name].to(am.dtype), {b.name: S_cur[b.name].to(am.dtype) for b in tm.blocks})
                A, Sb = cast[tm.name]
                if _token_space_cheaper(tm, am.shape[1]):
                    _refine_token_space(am, sm, tm, A, Sb, A_new, S_new)
                else:
                    for g in _sequence_grads(am, sm, tm.out_features, tm.in_dim):
                        for blk in tm.blocks:
                            gb = g[:, blk.rows, :]
                            S_new[blk.name] += torch.einsum("boi,bpi->op", gb @ A, gb).double()
                            A_new[tm.name] += torch.einsum("boi,boj->ij", Sb[blk.name] @ gb, gb).double()
        bar.update(batch.size)
    bar.close()
    for m, A in A_new.items():
        A = 0.5 * (A + A.T)
        tr = float(torch.trace(A))
        if not tr > 0:
            continue  # a module that saw no gradient: keep its token covariance
        fs.A_sum[m] = (A * (float(torch.trace(fs.A_sum[m].double())) / tr)).to(fs.A_sum[m].dtype)
    for b, S in S_new.items():
        S = 0.5 * (S + S.T)
        tr = float(torch.trace(S))
        if not tr > 0:
            continue
        st = fs.stats[b]
        st.S_sum = (S * (float(torch.trace(st.S_sum.double())) / tr)).to(st.S_sum.dtype)


def _lambda_pass(model, tms, data, cfg: FitConfig, fs: FactorSet, sdt, progress: bool):
    """Sums over sequences of the squared per-sequence gradient, rotated into the eigenbasis (EK-FAC)
    or not (diagonal)."""
    name = "eigenvalue-correction pass" if cfg.strategy == "ekfac" else "diagonal pass"
    bar = tqdm(desc=name, unit="ex", total=cfg.max_examples, disable=not progress)
    rot: dict[str, tuple] = {}
    sums: dict[str, torch.Tensor] = {}
    for batch in _batches(data, cfg.max_examples):
        _check_batch(batch, cfg.objective)
        for a, s in _draws(model, tms, batch, cfg, 1):
            for tm in tms:
                am, sm = a[tm.name], s[tm.name]
                if cfg.strategy == "ekfac":
                    if tm.name not in rot:
                        rot[tm.name] = (fs.QA[tm.name].to(am.dtype), _block_rotation(fs, tm, sm.dtype))
                    QA, rotate_s = rot[tm.name]
                    am, sm = am @ QA, rotate_s(sm)
                lam = None
                for g in _sequence_grads(am, sm, tm.out_features, tm.in_dim):
                    part = (g * g).sum(0)
                    lam = part if lam is None else lam + part
                lam = lam.to(sdt)
                sums[tm.name] = sums[tm.name] + lam if tm.name in sums else lam
            fs.n_examples_lambda += batch.size
        bar.update(batch.size)
    bar.close()
    if fs.n_examples_lambda == 0:
        raise ValueError("the data gave no examples to fit on")
    for tm in tms:
        for blk in tm.blocks:
            st = fs.stats.setdefault(blk.name, BlockStats())
            x = sums[tm.name][blk.rows].clone()
            st.lambda_sum = x if st.lambda_sum is None else st.lambda_sum + x
