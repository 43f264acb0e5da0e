"""Factors on disk: ``factors.safetensors`` + ``factors.json``, written atomically, checked on load.

The metadata holds the format version, the counts, the strategy, the tracked modules and their
blocks, the tensor file's size and sha256, and its own checksum; :func:`read_factors` refuses a
missing, truncated, edited or corrupt file with a :class:`FactorError` that names the fix. Used
through :meth:`msif.curvature.factors.FactorSet.save` and :meth:`~msif.curvature.factors.FactorSet.load`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .. import __version__
from ..atomic import atomic_dir
from ..errors import MsifError
from ..models.adapters import Block, TrackedModule
from ..tensorfile import save_tensors

FORMAT_VERSION = 1
TENSOR_FILE = "factors.safetensors"
META_FILE = "factors.json"


class FactorError(MsifError, ValueError):
    """Factors that cannot be used: corrupt, truncated, or fitted on another model."""


def write_factors(fs, out_dir: str | os.PathLike, checksum=None) -> Path:
    """Write the :class:`~msif.curvature.factors.FactorSet` ``fs`` into ``out_dir`` atomically (a
    temporary folder beside it, renamed into place: a killed run leaves the old factors or the new).
    ``checksum``: ``path ↦ hex digest`` of the tensor file (default :func:`sha256_file`)."""
    checksum = checksum or sha256_file
    if fs.meta.get("sums_dropped"):
        raise FactorError("these factors were loaded for scoring only (without their covariance sums); save the original fit")

    def write(tmp: Path):
        tensor_path = tmp / TENSOR_FILE
        save_tensors(fs._tensors(), tensor_path, metadata={"msif_format": str(FORMAT_VERSION)})
        meta = dict(fs.meta)
        meta.update(
            format_version=FORMAT_VERSION,
            msif_version=__version__,
            strategy=fs.strategy,
            n_tokens=fs.n_tokens,
            n_examples_cov=fs.n_examples_cov,
            n_examples_lambda=fs.n_examples_lambda,
            modules=[_tm_to_json(tm) for tm in fs.modules.values()],
            sha256=checksum(tensor_path),
            tensor_bytes=tensor_path.stat().st_size,
            factor_dtype=str(fs.dtype).removeprefix("torch."),
        )
        meta["meta_sha256"] = _meta_sha256(meta)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))

    return atomic_dir(out_dir, write)


def read_factors(cls, path: str | os.PathLike, verify: bool = True, for_scoring: bool = False,
                 device: str | torch.device | None = None):
    """A ``cls`` (:class:`~msif.curvature.factors.FactorSet`) read from ``path`` after every check
    (see :meth:`~msif.curvature.factors.FactorSet.load` for the arguments)."""
    p = Path(path)
    meta_path, tensor_path = p / META_FILE, p / TENSOR_FILE
    meta = _checked_meta(p, meta_path, tensor_path, verify)
    skip = ("A_sum/", "S_sum/") if for_scoring and meta["strategy"] in ("ekfac", "kfac") else ()
    t = _read_tensors(tensor_path, skip)
    try:
        modules = {d["name"]: _tm_from_json(d) for d in meta["modules"]}
        blocks = {b.name: b for tm in modules.values() for b in tm.blocks}
        fs = cls(
            strategy=meta["strategy"],
            modules=modules,
            blocks=blocks,
            n_tokens=meta["n_tokens"],
            n_examples_cov=meta["n_examples_cov"],
            n_examples_lambda=meta["n_examples_lambda"],
            meta={k: v for k, v in meta.items() if k not in ("modules",)},
        )
    except (KeyError, TypeError, ValueError) as e:
        raise FactorError(f"{meta_path} is incomplete or malformed (entry {e}); re-run `msif fit`") from None
    _check_shapes(t, modules, blocks, meta_path)
    if skip:
        fs.meta["sums_dropped"] = True
    for key in list(t):
        x = t.pop(key)
        # own, aligned memory: results then match the fresh factors bit for bit
        x = x.clone() if device is None or torch.device(device).type == "cpu" else x.to(device)
        fs.set_tensor(key, x)
    return fs


def _checked_meta(p: Path, meta_path: Path, tensor_path: Path, verify: bool) -> dict:
    """The metadata, after checking that both files exist, the format, its checksum, the tensor file's
    size and (``verify``) its sha256."""
    if not meta_path.exists() or not tensor_path.exists():
        raise FactorError(
            f"{p} holds no msif factors (expected {META_FILE} and {TENSOR_FILE}); fit them with `msif fit`"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FactorError(f"{meta_path} is corrupt ({e}); re-run `msif fit`") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        got = meta.get("format_version") if isinstance(meta, dict) else None
        raise FactorError(f"{p}: factor format {got} is not {FORMAT_VERSION}; re-fit")
    if "meta_sha256" in meta and _meta_sha256(meta) != meta["meta_sha256"]:
        raise FactorError(f"{meta_path} was edited after it was written (it does not match its checksum): its counts, "
                          "strategy and shapes decide every score; re-run `msif fit`")
    size = tensor_path.stat().st_size
    if size != meta.get("tensor_bytes"):
        raise FactorError(
            f"{tensor_path} is {size} bytes, not the {meta.get('tensor_bytes')} written: the file is truncated "
            "or was replaced; re-run `msif fit`"
        )
    if verify and sha256_file(tensor_path) != meta.get("sha256"):
        raise FactorError(f"{tensor_path} does not match its checksum: the file is corrupt; re-run `msif fit`")
    return meta


def _read_tensors(tensor_path: Path, skip: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Every tensor of the file by its key, except those whose key starts with one of ``skip``."""
    try:
        t = {}
        with safe_open(str(tensor_path), framework="pt") as f:
            for key in f.keys():
                if not key.startswith(skip or ("\0",)):
                    t[key] = f.get_tensor(key)
        return t
    except (SafetensorError, OSError, ValueError) as e:
        raise FactorError(f"{tensor_path} cannot be read ({e}); re-run `msif fit`") from None


def _meta_sha256(meta: dict) -> str:
    """Checksum of the metadata without its own checksum field (canonical JSON)."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _check_shapes(t: dict, modules: dict, blocks: dict, meta_path) -> None:
    """Every tensor of the file has the shape its module / block in the metadata claims."""
    for key, x in t.items():
        kind, name = key.split("/", 1)
        if kind in ("A_sum", "QA", "eigA"):
            tm = modules.get(name)
            want = None if tm is None else ((tm.in_dim,) if kind == "eigA" else (tm.in_dim, tm.in_dim))
        else:
            b = blocks.get(name)
            tm = None if b is None else modules.get(b.module)
            want = None if tm is None else {"S_sum": (b.out_dim, b.out_dim), "QS": (b.out_dim, b.out_dim), "eigS": (b.out_dim,),
                                            "lambda_sum": (b.out_dim, tm.in_dim)}.get(kind, tuple(x.shape))
        if want is None:
            raise FactorError(f"{meta_path} does not describe tensor {key!r} of the factor file; re-run `msif fit`")
        if tuple(x.shape) != tuple(want):
            raise FactorError(f"tensor {key!r} has shape {tuple(x.shape)}, {meta_path} claims {tuple(want)}; re-run `msif fit`")


def _tm_to_json(tm: TrackedModule) -> dict:
    return dict(
        name=tm.name,
        role=tm.role,
        in_features=tm.in_features,
        out_features=tm.out_features,
        bias=tm.bias,
        transposed=tm.transposed,
        blocks=[dict(name=b.name, row_start=b.row_start, row_stop=b.row_stop, head=b.head, proj=b.proj) for b in tm.blocks],
    )


def _tm_from_json(d: dict) -> TrackedModule:
    blocks = tuple(Block(b["name"], d["name"], d["role"], b["row_start"], b["row_stop"], b["head"], b["proj"]) for b in d["blocks"])
    return TrackedModule(d["name"], d["role"], d["in_features"], d["out_features"], d["bias"], d["transposed"], blocks)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read 4 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
