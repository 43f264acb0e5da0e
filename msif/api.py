"""The Python API in a few functions (the CLI calls these).

>>> import msif.api as ms
>>> factors = ms.fit("path/to/pythia", "corpus.jsonl", out="factors/pt", objective="lm")
>>> factors = ms.load_factors("factors/pt")
"""

from __future__ import annotations

import os
from pathlib import Path

from .curvature.factors import FactorSet
from .curvature.fit import FitConfig, fit_factors
from .data.examples import ExampleBatches, Fields


def _model_and_tokenizer(model, tokenizer, objective: str):
    from .models.loading import load_model, load_tokenizer

    name = None
    if isinstance(model, (str, os.PathLike)):
        name = str(model)
        if tokenizer is None:
            tokenizer = name
        model = load_model(name, task="classification" if objective == "classification" else "causal_lm")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(str(tokenizer))
    return model, tokenizer, name


def fit(
    model,
    data,
    out: str | os.PathLike | None = None,
    tokenizer=None,
    objective: str = "lm",
    strategy: str = "ekfac",
    modules: str = "all",
    per_head: bool = True,
    labels: str = "sampled",
    max_examples: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    fields: Fields | None = None,
    max_length: int | None = None,
    truncate: bool = False,
    generic: bool = False,
    progress: bool = True,
    model_name: str | None = None,
    samples: int = 1,
    refine: int = 0,
) -> FactorSet:
    """Fit curvature factors of ``model`` on ``data`` and (if ``out``) save them atomically.

    ``model``: a loaded HF model, or a local checkpoint folder / hub id. ``data``: a JSONL / Parquet /
    ``datasets`` path (fields per ``objective``: ``text``; ``prompt``+``answer``; ``text``+``label``), or
    a re-iterable of :class:`msif.data.encoding.Batch`.
    """
    model, tokenizer, name = _model_and_tokenizer(model, tokenizer, objective)
    if isinstance(data, (str, os.PathLike)):
        if tokenizer is None:
            raise ValueError("a tokenizer is needed to read a data file: pass tokenizer=...")
        if max_length is None:
            max_length = getattr(model.config, "max_position_embeddings", None)
        from .models.loading import check_tokenizer

        check_tokenizer(model, tokenizer)
        data = ExampleBatches(data, tokenizer, objective, batch_size=batch_size, fields=fields,
                              max_examples=max_examples, max_length=max_length, truncate=truncate)
    cfg = FitConfig(objective=objective, strategy=strategy, modules=modules, per_head=per_head, labels=labels,
                    seed=seed, max_examples=max_examples, batch_size=batch_size, generic=generic, samples=samples, refine=refine)
    fs = fit_factors(model, data, cfg, progress=progress, model_name=model_name or name)
    if out is not None:
        fs.save(out)
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
