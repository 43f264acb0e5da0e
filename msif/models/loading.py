"""Loading checkpoints, checking tokenizer/model agreement, fingerprinting and matching backbones.

* :func:`load_model` / :func:`load_tokenizer` / :func:`load_model_and_tokenizer` read a Hugging Face
  checkpoint (a local folder, or a hub id when the hub is reachable) and put the model in eval mode.
* :func:`check_tokenizer_matches_model` raises :class:`TokenizerMismatchError` when a tokenizer cannot
  belong to a model (more tokens than embedding rows, special tokens outside the vocabulary).
* :func:`model_fingerprint` is a short stable hash of a model's tracked weights, stored with fitted
  factors so that they are never applied to another model by mistake.
* :func:`backbone_match` lists the tracked modules that a pre-trained and a fine-tuned model (e.g. a
  causal LM and a classifier built from it) share, and raises :class:`BackboneMismatchError` otherwise.

The fingerprints live in :mod:`msif.models.fingerprint` and the backbone match in
:mod:`msif.models.backbone`; their names are importable from here too.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..errors import MsifError
from .backbone import BackboneMismatchError, backbone_match
from .fingerprint import FINGERPRINT_SAMPLE, model_fingerprint, tokenizer_fingerprint  # noqa: F401  (re-exported)

TASKS = ("causal_lm", "classification", "auto")


class ModelLoadError(MsifError, OSError):
    """A checkpoint or tokenizer could not be loaded (missing folder, unreachable hub, bad files)."""


class TokenizerMismatchError(MsifError, ValueError):
    """The tokenizer does not fit the model's vocabulary."""


# ----------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------


def _looks_local(path_or_id: str) -> bool:
    """True for strings that can only be a filesystem path (never a hub id ``name`` / ``org/name``)."""
    s = str(path_or_id)
    return (
        s.startswith(("/", "./", "../", "~", "\\"))
        or s in (".", "..")
        or s.count("/") > 1
        or (os.sep != "/" and os.sep in s)
        or (len(s) > 1 and s[1] == ":")  # C:\...
    )


def _resolve(path_or_id: str | os.PathLike, what: str) -> tuple[str, bool]:
    """``(string to pass to from_pretrained, is_local_folder)``; a missing local path is an error."""
    s = os.fspath(path_or_id)
    expanded = os.path.expanduser(s)
    if os.path.isdir(expanded):
        if what == "model" and not os.path.isfile(os.path.join(expanded, "config.json")):
            raise ModelLoadError(
                f"could not load the model from the local folder {s!r}: it has no config.json, so it is not a "
                "Hugging Face checkpoint folder (save one with model.save_pretrained(folder))"
            )
        return expanded, True
    if os.path.exists(expanded):
        raise ModelLoadError(f"{what} path {s!r} is a file; pass the checkpoint folder (the one with config.json)")
    if isinstance(path_or_id, os.PathLike) or _looks_local(s):
        where = "" if os.path.isabs(expanded) else f" (relative to {os.getcwd()!r})"
        raise ModelLoadError(f"no such {what} folder: {s!r}{where}; pass the checkpoint folder saved by save_pretrained "
                             "(the one with config.json), or a hub id such as org/name")
    return s, False


def _load_error(path: str, local: bool, what: str, err: Exception) -> ModelLoadError:
    if local:
        return ModelLoadError(f"could not load the {what} from the local folder {path!r}: {err}")
    return ModelLoadError(
        f"could not load the {what} {path!r}: it is not a local folder, and it could not be fetched from "
        f"the Hugging Face Hub (the hub is unreachable, offline mode is on, or the id does not exist). "
        f"Download the checkpoint where the hub is reachable (e.g. `huggingface-cli download {path} "
        f"--local-dir DIR`) and pass the local folder instead. Cause: {type(err).__name__}: {err}"
    )


def parse_dtype(dtype: Any) -> Any:
    """``None`` / ``"auto"`` / a ``torch.dtype`` / a name (``"bf16"``, ``"float32"`` ...) → what ``from_pretrained`` takes."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if isinstance(dtype, str):
        name = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}.get(dtype, dtype)
        dt = getattr(torch, name, None)
        if isinstance(dt, torch.dtype) and dt.is_floating_point:
            return dt
    raise ValueError(f"dtype must be a torch floating dtype, a name such as 'bfloat16', 'auto' or None, not {dtype!r}")


def _resolve_task(path: str, local: bool, task: str, kwargs: dict) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
    if task != "auto":
        return task
    from transformers import AutoConfig

    cfg_kwargs = {k: kwargs[k] for k in ("revision", "trust_remote_code", "local_files_only", "token") if k in kwargs}
    try:
        cfg = AutoConfig.from_pretrained(path, **cfg_kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(path, local, "model config", e) from e
    archs = getattr(cfg, "architectures", None) or []
    return "classification" if any(a.endswith("ForSequenceClassification") for a in archs) else "causal_lm"


def load_model(
    path_or_id: str | os.PathLike,
    task: str = "causal_lm",
    dtype: Any = None,
    device: str | torch.device = "cpu",
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """Load a Hugging Face checkpoint as a causal LM or a sequence classifier, in eval mode.

    Args:
        path_or_id: a local checkpoint folder, or a hub id (``"EleutherAI/pythia-70m"``) when the hub
            is reachable.
        task: ``"causal_lm"`` (``AutoModelForCausalLM``), ``"classification"``
            (``AutoModelForSequenceClassification``; pass ``num_labels=...`` when the checkpoint is a
            causal LM whose head is replaced) or ``"auto"`` (classification when the checkpoint's
            ``config.architectures`` names a ``...ForSequenceClassification`` class, else causal LM).
        dtype: ``None`` (transformers' default: the checkpoint's own dtype), ``"auto"``, a
            ``torch.dtype`` or its name (``"float32"``, ``"bfloat16"``, ``"bf16"``, ...).
        device: where to put the model.
        **from_pretrained_kwargs: passed to ``from_pretrained`` (``revision``, ``num_labels``,
            ``local_files_only``, ``attn_implementation``, ...).

    Raises:
        ModelLoadError: the folder does not exist, the files cannot be read, or a hub id cannot be
            downloaded (the message says to pass a local folder).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path, local = _resolve(path_or_id, "model")
    task = _resolve_task(path, local, task, from_pretrained_kwargs)
    dt = parse_dtype(dtype)
    kwargs = dict(from_pretrained_kwargs)
    if dt is not None:
        kwargs["dtype"] = dt
    cls = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    try:
        model = cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(path, local, "model", e) from e
    model.to(device)
    model.eval()
    return model


def load_tokenizer(path_or_id: str | os.PathLike, **from_pretrained_kwargs: Any):
    """Load the tokenizer of a checkpoint (local folder or reachable hub id) with ``AutoTokenizer``.

    Raises:
        ModelLoadError: as :func:`load_model`.
    """
    from transformers import AutoTokenizer

    path, local = _resolve(path_or_id, "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(path, **from_pretrained_kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(path, local, "tokenizer", e) from e


def check_tokenizer_matches_model(tokenizer, model: nn.Module) -> None:
    """Raise :class:`TokenizerMismatchError` unless ``tokenizer`` can feed ``model``.

    The tokenizer's size (``len(tokenizer)``, added tokens included) must not exceed the number of rows
    of the model's input embedding (a model may have more rows than tokens: Pythia pads its vocabulary),
    and every special token must be a real vocabulary entry whose id has an embedding row (a special
    token missing from the vocabulary silently maps to the unknown token).
    """
    emb = model.get_input_embeddings()
    if emb is None or getattr(emb, "weight", None) is None:
        raise TokenizerMismatchError(f"{type(model).__name__} has no input embedding to check the tokenizer against")
    rows = emb.weight.shape[0]
    n = len(tokenizer)
    hint = "pass the tokenizer saved with this checkpoint (or resize the model's embeddings after adding tokens)"
    if n > rows:
        raise TokenizerMismatchError(
            f"mismatched tokenizer: it has {n} tokens but the model's input embedding has only {rows} rows; {hint}"
        )
    special = getattr(tokenizer, "all_special_tokens", None) or []
    for tok in special:
        tid = tokenizer.convert_tokens_to_ids(tok)
        if tid is None or (isinstance(tid, int) and tokenizer.convert_ids_to_tokens(tid) != tok):
            raise TokenizerMismatchError(
                f"mismatched tokenizer: special token {tok!r} is not in its vocabulary (it would be encoded as "
                f"{tokenizer.convert_ids_to_tokens(tid) if tid is not None else None!r}); {hint}"
            )
        if not 0 <= tid < rows:
            raise TokenizerMismatchError(
                f"mismatched tokenizer: special token {tok!r} has id {tid}, outside the model's {rows} embedding rows; {hint}"
            )


def check_tokenizer(model: nn.Module, tokenizer) -> None:
    """Same as :func:`check_tokenizer_matches_model`, model first (either order is accepted)."""
    if isinstance(tokenizer, nn.Module) and not isinstance(model, nn.Module):
        model, tokenizer = tokenizer, model
    check_tokenizer_matches_model(tokenizer, model)


def load_model_and_tokenizer(
    path_or_id: str | os.PathLike,
    task: str = "causal_lm",
    dtype: Any = None,
    device: str | torch.device = "cpu",
    tokenizer_path: str | os.PathLike | None = None,
    **from_pretrained_kwargs: Any,
):
    """Load ``(model, tokenizer)`` from one checkpoint and check that they agree.

    ``tokenizer_path`` loads the tokenizer from elsewhere (default: ``path_or_id``). For a
    classification model without ``config.pad_token_id``, it is set from the tokenizer (its pad token,
    else its EOS token), since HF classifiers need it to find the last token of a padded batch.

    Raises:
        ModelLoadError: see :func:`load_model`.
        TokenizerMismatchError: see :func:`check_tokenizer_matches_model`.
    """
    model = load_model(path_or_id, task=task, dtype=dtype, device=device, **from_pretrained_kwargs)
    tok_kwargs = {k: from_pretrained_kwargs[k] for k in ("revision", "local_files_only", "token", "trust_remote_code")
                  if k in from_pretrained_kwargs}
    tokenizer = load_tokenizer(tokenizer_path if tokenizer_path is not None else path_or_id, **tok_kwargs)
    check_tokenizer_matches_model(tokenizer, model)
    cfg = model.config
    if type(model).__name__.endswith("ForSequenceClassification") and getattr(cfg, "pad_token_id", None) is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is not None:
            cfg.pad_token_id = pad
    return model, tokenizer


__all__ = [
    "TASKS",
    "FINGERPRINT_SAMPLE",
    "ModelLoadError",
    "TokenizerMismatchError",
    "BackboneMismatchError",
    "load_model",
    "load_tokenizer",
    "load_model_and_tokenizer",
    "check_tokenizer_matches_model",
    "check_tokenizer",
    "model_fingerprint",
    "backbone_match",
]
