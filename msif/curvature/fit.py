"""Fitting curvature factors: covariance pass → float64 eigendecomposition → eigenvalue-correction pass.

Every pass is a forward and an activation-only backward of the model (no parameter gradients) with
hooks on the tracked layers. The statistics are consumed inside the hooks, module by module: a
module's input ``a`` is summed (covariance pass) or kept only until its own output gradient ``s``
arrives in the backward (eigenvalue and refinement passes), so the memory of a fit is the model,
the factor sums, autograd's own activations for one batch, the tracked layers' inputs, and one
module's per-example work. Statistics are sums with counts (tokens and sequences actually seen), so
partial runs merge by addition (:meth:`FactorSet.merge_`), and a killed fit resumes from its last
checkpoint to the same factors (:mod:`msif.curvature.checkpoint`). The passes themselves are in
:mod:`msif.curvature.passes`; this module holds the settings (:class:`FitConfig`) and the driver.

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
from .factors import STRATEGIES, FactorError, FactorSet
from .hooks import stream_batch
from .passes import _Pass, _make_pass, _stages
# kept importable from here (msif.influence.scoring, tests/test_kernels.py and msif.plan use these names)
from .passes import _CovariancePass, _gram_strips, _mirror_strips, compute_dtype, gram_flops  # noqa: F401

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
# the driver
# ---------------------------------------------------------------------------------------------------


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
    fs, identity = _new_factor_set(model, tms, cfg, sdt, fdt, model_name, fingerprint)
    path = Path(checkpoint) if checkpoint is not None else None
    w = world()
    run = _FitRun(model, tms, data, cfg, fs, sdt, fdt, device, path, identity, checkpoint_every, progress and w.main, total)
    state = _resume(path, identity, fs, device)
    stages = _stages(cfg)
    if state.stage or state.batches:
        fs.meta["resumed"] = True
        if run.progress:
            print(f"resuming the fit from {path} ({stages[state.stage] if state.stage < len(stages) else 'done'}, "
                  f"{state.batches} batches done)", flush=True)
    fs.meta["timings"].update(state.timings)
    was_training = model.training
    model.eval()
    try:
        for si in range(state.stage, len(stages)):
            state = _fit_stage(run, stages, si, state)
        if w.active:
            fs.meta["world_size"] = w.size
    finally:
        model.train(was_training)
    return fs


@dataclass
class _FitRun:
    """What every pass of one fit shares: the model and data, the settings, the factors being fitted
    and the checkpoint (``path``, ``identity``, every ``every`` batches)."""

    model: nn.Module
    tms: list
    data: Iterable[Batch]
    cfg: FitConfig
    fs: FactorSet
    sdt: torch.dtype
    fdt: torch.dtype
    device: torch.device
    path: Path | None
    identity: dict
    every: int
    progress: bool
    total: int | None


def _new_factor_set(model: nn.Module, tms, cfg: FitConfig, sdt, fdt, model_name: str | None,
                    fingerprint: str | None) -> tuple[FactorSet, dict]:
    """An empty :class:`FactorSet` for ``tms`` with the fit's metadata, and the identity a checkpoint
    must match to be resumed (settings, model fingerprint, blocks, dtypes)."""
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
    return fs, identity


def _fit_stage(run: _FitRun, stages: list[str], si: int, state: ckpt.PassState) -> ckpt.PassState:
    """Stage ``si``: its pass over the data (resumed from ``state`` when it is the interrupted one), the sums
    reduced over the ranks and turned into factors, the eigendecomposition after a covariance or refinement
    pass, and a checkpoint between stages. Returns the state the next stage starts from."""
    fs = run.fs
    p = _make_pass(stages[si], fs, run.tms, run.cfg, run.sdt)
    if si == state.stage:
        p.acc, p.counts = state.acc, dict(state.counts) or p.counts
    t0 = time.perf_counter()
    _run_pass(run.model, run.tms, run.data, run.cfg, p, state, run.path, run.identity, run.every, run.progress,
              run.total, run.device)
    reduce_sums(p.acc, p.counts, f"summing the {p.name} over the ranks")
    p.finish()
    key = stages[si].split(":")[0]
    _time(fs, f"{key}_s", time.perf_counter() - t0)
    if stages[si] != "lambda":
        t0 = time.perf_counter()
        _eigendecompose(fs, run.fdt)
        _time(fs, "eigendecomposition_s", time.perf_counter() - t0)
    state = ckpt.PassState(stage=si + 1, data_digest=state.data_digest, timings=dict(fs.meta["timings"]))
    if run.path is not None and si + 1 < len(stages) and world().main:
        ckpt.save(run.path, run.identity, fs, state)
    return state


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
