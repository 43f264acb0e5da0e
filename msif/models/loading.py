"""Loading checkpoints, checking tokenizer/model agreement, fingerprinting and matching backbones.

* :func:`load_model` / :func:`load_tokenizer` / :func:`load_model_and_tokenizer` read a Hugging Face
  checkpoint (a local folder, or a hub id when the hub is reachable) and put the model in eval mode.
* :func:`check_tokenizer_matches_model` raises :class:`TokenizerMismatchError` when a tokenizer cannot
  belong to a model (more tokens than embedding rows, special tokens outside the vocabulary).
* :func:`model_fingerprint` is a short stable hash of a model's tracked weights, stored with fitted
  factors so that they are never applied to another model by mistake.
* :func:`backbone_match` lists the tracked modules that a pre-trained and a fine-tuned model (e.g. a
  causal LM and a classifier built from it) share, and raises :class:`BackboneMismatchError` otherwise.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from typing import Any, Sequence

import torch
from torch import nn

from msif.models.adapters import TrackedModule
from ..errors import MsifError

TASKS = ("causal_lm", "classification", "auto")

#: at most this many elements of each tracked tensor are hashed value by value (a strided subsample)
FINGERPRINT_SAMPLE = 65536
#: elements per chunk when summing a tensor's bit patterns (bounds the temporary memory)
_SUM_CHUNK = 1 << 24


class ModelLoadError(MsifError, OSError):
    """A checkpoint or tokenizer could not be loaded (missing folder, unreachable hub, bad files)."""


class TokenizerMismatchError(MsifError, ValueError):
    """The tokenizer does not fit the model's vocabulary."""


class BackboneMismatchError(MsifError, ValueError):
    """Two models do not share the tracked backbone that multi-stage influence needs."""


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


# ----------------------------------------------------------------------------------------------------
# fingerprint
# ----------------------------------------------------------------------------------------------------


def _tracked_tensors(model: nn.Module, tm: TrackedModule) -> list[tuple[str, torch.Tensor]]:
    mod = model.get_submodule(tm.name)
    out = [("weight", mod.weight)]
    if tm.bias:
        out.append(("bias", mod.bias))
    return out


def _tensor_digest(t: torch.Tensor) -> tuple[bytes, int]:
    """(float32 bytes of a strided subsample of at most FINGERPRINT_SAMPLE elements, bit-pattern sum).

    The sum adds the float32 bit patterns of *all* elements as int64 (wrapping on overflow): integer
    addition is exact and associative, so unlike a floating-point sum it does not depend on the
    device, the thread count or the reduction order, yet any changed element changes it.
    """
    if t.device.type == "meta":
        raise ValueError("cannot fingerprint a model whose weights are on the meta device (not loaded)")
    flat = t.detach().reshape(-1)
    n = flat.numel()
    stride = max(1, math.ceil(n / FINGERPRINT_SAMPLE))
    sample = flat[::stride].to(device="cpu", dtype=torch.float32).contiguous()
    total = 0
    for i in range(0, n, _SUM_CHUNK):
        chunk = flat[i : i + _SUM_CHUNK].to(torch.float32).view(torch.int32).to(torch.int64)
        total += int(chunk.sum().item())
    total = (total + (1 << 63)) % (1 << 64) - (1 << 63)
    return sample.numpy().tobytes(), total


def tokenizer_fingerprint(tokenizer) -> str | None:
    """A short hash (16 hex characters) of a tokenizer's vocabulary (token → id, added tokens included),
    or ``None`` for an object without ``get_vocab``. Two tokenizers with the same size but another
    vocabulary differ: factors fitted through one do not describe texts encoded by the other."""
    import hashlib
    import json

    vocab = getattr(tokenizer, "get_vocab", None)
    if vocab is None:
        return None
    items = sorted(vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def model_fingerprint(model: nn.Module, tms: Sequence[TrackedModule]) -> str:
    """A stable short hash (20 hex characters) of a model's tracked backbone.

    It covers ``config.model_type``, the tracked module names, shapes and bias flags, and the values of
    their weights and biases: for each tensor a deterministic strided subsample of at most
    :data:`FINGERPRINT_SAMPLE` elements (as float32 bytes) and an exact order-independent checksum of
    all its elements, so it costs one pass over the tracked weights (no copy to the CPU) and changes
    when any tracked weight changes. It is equal for the same weights loaded twice, and for a causal
    LM and a sequence classifier sharing one backbone; untracked parameters (embeddings, heads, norms)
    and the per-head block split do not enter. The dtype does: the same model in bfloat16 and in
    float32 has two fingerprints.
    """
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None) or type(model).__name__
    h = hashlib.sha256()
    h.update(f"msif-fingerprint-v1\0{model_type}\0".encode())
    for tm in sorted(tms, key=lambda t: t.name):
        h.update(f"{tm.name}\0{tm.out_features}x{tm.in_features}\0bias={int(tm.bias)}\0".encode())
        for kind, t in _tracked_tensors(model, tm):
            sample, total = _tensor_digest(t)
            h.update(f"{kind}\0{tuple(t.shape)}\0".encode())
            h.update(sample)
            h.update(struct.pack("<q", total))
    return h.hexdigest()[:20]


# ----------------------------------------------------------------------------------------------------
# backbone matching
# ----------------------------------------------------------------------------------------------------


def _actual_shape(model: nn.Module, tm: TrackedModule, which: str) -> tuple[int, int]:
    try:
        mod = model.get_submodule(tm.name)
    except AttributeError as e:
        raise BackboneMismatchError(f"model {which} has no module {tm.name!r} (stale tracked-module list?)") from e
    w = mod.weight
    return (w.shape[1], w.shape[0]) if tm.transposed else (w.shape[0], w.shape[1])


def _describe(tm: TrackedModule) -> str:
    return f"weight {tm.out_features}x{tm.in_features}{' + bias' if tm.bias else ''}, {len(tm.blocks)} block(s)"


def backbone_match(
    model_a: nn.Module,
    model_b: nn.Module,
    tms_a: Sequence[TrackedModule],
    tms_b: Sequence[TrackedModule],
    strict: bool = True,
) -> list[TrackedModule]:
    """The tracked modules (with their blocks) that models A and B share, in A's order.

    Modules are matched by name; a shared module must have the same shape, bias, storage layout and
    block split in both lists, and the lists must agree with the models' actual weights. Typical use:
    A is the pre-trained causal LM, B the fine-tuned model (a causal LM or a classifier built from it);
    their embeddings and heads are not tracked, so they may differ.

    With ``strict=True`` (default) every tracked module of either model must be tracked in the other;
    with ``strict=False`` modules tracked in only one of them are left out (e.g. A tracked with
    ``modules="mlp"``), as long as at least one is shared.

    Raises:
        BackboneMismatchError: naming the first mismatch (different architectures, a module tracked
            in only one model, or a module whose shape or blocks differ).
    """
    type_a = getattr(getattr(model_a, "config", None), "model_type", None)
    type_b = getattr(getattr(model_b, "config", None), "model_type", None)
    if type_a != type_b:
        raise BackboneMismatchError(
            f"backbones do not match: model A is a {type_a!r} model and model B a {type_b!r} model"
        )
    by_b = {t.name: t for t in tms_b}
    names_a = {t.name for t in tms_a}
    shared = []
    for ta in tms_a:
        tb = by_b.get(ta.name)
        if tb is None:
            if strict:
                raise BackboneMismatchError(
                    f"backbones do not match: module {ta.name!r} is tracked in model A but not in model B"
                )
            continue
        for which, model, t in (("A", model_a, ta), ("B", model_b, tb)):
            actual = _actual_shape(model, t, which)
            if actual != (t.out_features, t.in_features):
                raise BackboneMismatchError(
                    f"tracked module {t.name!r} of model {which} says {t.out_features}x{t.in_features} but the "
                    f"model's weight is {actual[0]}x{actual[1]}: recompute the tracked modules for this model"
                )
        if (ta.out_features, ta.in_features, ta.bias, ta.transposed) != (
            tb.out_features, tb.in_features, tb.bias, tb.transposed
        ) or ta.role != tb.role:
            raise BackboneMismatchError(
                f"backbones do not match at module {ta.name!r}: model A has {_describe(ta)} ({ta.role}), "
                f"model B has {_describe(tb)} ({tb.role})"
            )
        if ta.blocks != tb.blocks:
            raise BackboneMismatchError(
                f"backbones do not match at module {ta.name!r}: its blocks differ (model A: {len(ta.blocks)}, "
                f"model B: {len(tb.blocks)}); track both models with the same per_head setting"
            )
        shared.append(ta)
    if strict:
        for tb in tms_b:
            if tb.name not in names_a:
                raise BackboneMismatchError(
                    f"backbones do not match: module {tb.name!r} is tracked in model B but not in model A"
                )
    if not shared:
        raise BackboneMismatchError("backbones do not match: the two models share no tracked module")
    return shared


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
