"""The Python API in a few functions (the CLI calls these).

>>> import msif.api as ms
>>> factors = ms.fit("path/to/pythia", "corpus.jsonl", out="factors/pt", objective="lm")
>>> factors = ms.load_factors("factors/pt")
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from .curvature.factors import FactorSet
from .curvature.fit import FitConfig, fit_factors
from .data.examples import ExampleBatches, Fields


def _model_and_tokenizer(model, tokenizer, objective: str, dtype=None, device="cpu"):
    from .models.loading import load_model, load_tokenizer

    name = None
    if isinstance(model, (str, os.PathLike)):
        name = str(model)
        if tokenizer is None:
            tokenizer = name
        model = load_model(name, task="classification" if objective == "classification" else "causal_lm", dtype=dtype,
                           device=device)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(str(tokenizer))
    return model, tokenizer, name


def fit(
    model,
    data,
    config: FitConfig | None = None,
    *,
    out: str | os.PathLike | None = None,
    tokenizer=None,
    fields: Fields | None = None,
    max_length: int | None = None,
    truncate: bool = False,
    progress: bool = True,
    model_name: str | None = None,
    checkpoint_every: int = 100,
    resume: bool = True,
    dtype=None,
    device: str = "cpu",
    fsdp: bool = False,
    overwrite: bool = False,
    **settings,
) -> FactorSet:
    """Fit curvature factors of ``model`` on ``data`` with the settings ``config`` (a whole
    :class:`~msif.curvature.fit.FitConfig`, stored with the factors) and (if ``out``) save them atomically.

    ``settings``: :class:`FitConfig` fields that override ``config``'s (or the defaults), e.g.
    ``fit(model, data, out="f", objective="answer", batch_size=16)``.
    ``model``: a loaded HF model, or a local checkpoint folder / hub id (loaded on ``device``).
    ``dtype``: run the model in this precision (``"bfloat16"``...; the fingerprint stays that of the
    weights as given, so the factors match the checkpoint). ``data``: a JSONL / Parquet / ``datasets`` path (fields per ``objective``: ``text``;
    ``prompt``+``answer``; ``text``+``label``), or a re-iterable of :class:`msif.data.encoding.Batch`.

    Under torchrun (``torchrun --nproc-per-node N``), the batches are split across the ranks and their
    sums reduced (:mod:`msif.distributed`); every rank returns the same factors, rank 0 writes them.
    ``fsdp``: also shard the model's weights across the ranks (FSDP2), for models that do not fit one
    device; load it on the CPU, it is moved to ``device`` shard by shard.

    With ``out``, the running sums are checkpointed atomically to ``OUT.checkpoint`` every
    ``checkpoint_every`` batches; a fit killed half-way and run again with the same arguments resumes
    there (``resume=False`` discards the checkpoint) and gives the same factors. The checkpoint is
    deleted once the factors are written.

    ``out`` is checked before any work: a file, a non-empty folder that holds no factors (a model
    checkpoint, other files) and, unless ``overwrite``, earlier factors are refused; one process at a
    time may write it (a second fit into the same ``out`` is refused while the first runs).
    """
    known = {f.name for f in dataclasses.fields(FitConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"fit() got an unknown setting {unknown[0]!r}; the settings are FitConfig's fields: {', '.join(sorted(known))}")
    cfg = dataclasses.replace(config or FitConfig(), **settings)
    cfg.validate()
    import contextlib

    from .atomic import OutputLock, prepare_out_dir
    from .distributed import init

    w, device = init(device)  # under torchrun: join the process group, one device per rank
    with OutputLock(out, "msif fit") if out is not None and w.main else contextlib.nullcontext():
        if out is not None:  # under the lock: nothing is clobbered, and no other fit writes here meanwhile
            prepare_out_dir(out, overwrite, "factors", marker="factors.json")
        return _fit(model, data, out, tokenizer, cfg, w, device, fields=fields, max_length=max_length, truncate=truncate,
                    progress=progress, model_name=model_name, checkpoint_every=checkpoint_every, resume=resume,
                    dtype=dtype, fsdp=fsdp)


def _fit(model, data, out, tokenizer, cfg, w, device, fields, max_length, truncate, progress, model_name,
         checkpoint_every, resume, dtype, fsdp) -> FactorSet:
    """:func:`fit` once its settings and output folder are checked."""
    from .distributed import barrier

    model, tokenizer, name = _model_and_tokenizer(model, tokenizer, cfg.objective, None, device)
    fingerprint = None
    if dtype is not None or fsdp:  # the factors belong to the checkpoint's weights, not to a rounded or sharded copy
        from .models.adapters import tracked_modules
        from .models.loading import model_fingerprint, parse_dtype

        fingerprint = model_fingerprint(model, tracked_modules(model, per_head=cfg.per_head, modules=cfg.modules,
                                                               generic=cfg.generic))
        if dtype is not None:
            model = model.to(parse_dtype(dtype))
    if fsdp:
        from .distributed import shard_model

        model = shard_model(model, device)
    total = None
    if isinstance(data, (str, os.PathLike)):
        if tokenizer is None:
            raise ValueError("a tokenizer is needed to read a data file: pass tokenizer=...")
        if max_length is None:
            max_length = getattr(model.config, "max_position_embeddings", None)
        from .models.loading import check_tokenizer

        check_tokenizer(model, tokenizer)
        data = ExampleBatches(data, tokenizer, cfg.objective, batch_size=cfg.batch_size, fields=fields,
                              max_examples=cfg.max_examples, max_length=max_length, truncate=truncate)
        total = data.num_examples() if progress else None
    ck = None
    if out is not None:
        from .curvature import checkpoint

        ck = checkpoint.default_path(out)
        if not resume and ck.exists() and w.main:
            shutil.rmtree(ck)
    fs = fit_factors(model, data, cfg, progress=progress, model_name=model_name or name, fingerprint=fingerprint,
                     checkpoint=ck, checkpoint_every=checkpoint_every, total=total)
    if isinstance(data, ExampleBatches):  # where the factors come from: refined query vectors sample it again
        from dataclasses import asdict

        from .models.loading import tokenizer_fingerprint

        fs.meta["tokenizer"] = tokenizer_fingerprint(data.tokenizer)  # attribute refuses texts encoded by another one

        fs.meta["data"] = dict(path=str(Path(data.path).resolve()), fields=asdict(data.fields), max_length=data.max_length,
                               truncate=data.truncate)
    if out is not None:
        if w.main:  # every rank holds the same factors; one writes them
            fs.save(out)
            shutil.rmtree(ck, ignore_errors=True)
        barrier("writing the factors")
    return fs


def load_factors(path: str | os.PathLike, model=None) -> FactorSet:
    """Load factors; with ``model``, check they were fitted on it (raises FactorError otherwise)."""
    fs = FactorSet.load(Path(path))
    if model is not None:
        from .models.adapters import tracked_modules
        from .models.loading import model_fingerprint

        tms = tracked_modules(model, per_head=fs.meta.get("per_head", True), modules=fs.meta.get("module_subset", "all"),
                              generic=fs.meta.get("config", {}).get("generic", False))
        fs.check_model(model_fingerprint(model, tms))
    return fs
