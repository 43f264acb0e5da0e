"""Fingerprints: a short stable hash of a model's tracked weights, stored with fitted factors so that they
are never applied to another model by mistake, and one of a tokenizer's vocabulary."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from typing import Sequence

import torch
from torch import nn

from msif.models.adapters import TrackedModule

#: at most this many elements of each tracked tensor are hashed value by value (a strided subsample)
FINGERPRINT_SAMPLE = 65536
#: elements per chunk when summing a tensor's bit patterns (bounds the temporary memory)
_SUM_CHUNK = 1 << 24


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
