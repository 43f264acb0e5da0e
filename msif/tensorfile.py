"""Writing ``.safetensors`` files one tensor at a time.

``safetensors.torch.save_file`` first turns every tensor into a ``bytes`` copy, so writing factors
briefly doubles their memory (0.5 GB more for a Pythia-70m fit, tens of GB for a 7B). The format is
simple (an 8-byte little-endian header length, a JSON header of dtypes, shapes and byte offsets,
then the raw little-endian data), so this writer streams each tensor's own memory to the file
instead. Files are read back with ``safetensors.safe_open`` / ``load_file`` as usual.
"""

from __future__ import annotations

import json
import os
import struct
import sys

import torch

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (any device; moved to the CPU one at a time) to the safetensors file ``path``."""
    if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for
        raise RuntimeError("save_tensors writes little-endian data only")
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    names = sorted(tensors)
    for k in names:
        t = tensors[k]
        if t.dtype not in _DTYPES:
            raise TypeError(f"tensor {k!r} has dtype {t.dtype}, which safetensors cannot store")
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data start 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k in names:
            t = tensors[k].detach().to("cpu").contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
