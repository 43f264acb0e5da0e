"""Resumable fits: the partial sums of a running fit, written atomically every N batches.

A fit is a fixed list of stages (covariance pass, refinement passes, eigenvalue-correction pass),
each a pass over the same batches that adds into sums. A checkpoint holds the factor set's tensors
of the finished stages, the running pass's partial sums and counts, and where it stopped (stage,
batches done, a chained hash of the batches seen in that pass). A resumed fit skips the batches
already summed, checks that they hash the same, and then adds the rest in the same order, so its
factors equal an uninterrupted fit's bit for bit. A checkpoint written by a fit with another model,
settings or data is refused (:class:`ResumeError`), never silently mixed in.

Layout: ``<dir>/state.json`` + ``<dir>/tensors.safetensors``, the folder replaced as a whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..atomic import atomic_dir
from ..tensorfile import save_tensors
from .factors import FactorError, FactorSet

CHECKPOINT_VERSION = 1
_STATE, _TENSORS = "state.json", "tensors.safetensors"


class ResumeError(FactorError):
    """A checkpoint that belongs to another fit (model, settings or data changed)."""


def chain_digest(prev: str, batch) -> str:
    """``sha256(prev ‖ ids ‖ mask ‖ target mask ‖ labels ‖ indices)`` of one batch: a running digest of
    the batches a pass has seen, cheap next to a forward pass and stable across processes."""
    h = hashlib.sha256(prev.encode())
    for t in (batch.input_ids, batch.attention_mask, batch.target_mask, batch.labels, batch.indices):
        if t is not None:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class PassState:
    """Where a fit stands: ``stage`` index, ``batches`` done in it, the pass's partial sums and counts,
    and the digest of the batches it has seen (``digest``) and of the first full pass (``data_digest``)."""

    stage: int = 0
    batches: int = 0
    acc: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    digest: str = ""
    data_digest: str = ""
    timings: dict[str, float] = field(default_factory=dict)


def default_path(out: str | os.PathLike) -> Path:
    """The checkpoint folder of a fit written to ``out``: ``OUT.checkpoint`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".checkpoint")


def save(path: Path, identity: dict, fs: FactorSet, st: PassState) -> None:
    """Write the checkpoint folder atomically (the previous checkpoint stays until the new one is whole)."""
    tensors = {f"fs/{k}": v for k, v in fs._tensors().items()}
    tensors.update({f"acc/{k}": v for k, v in st.acc.items()})
    state = dict(
        version=CHECKPOINT_VERSION, identity=identity, stage=st.stage, batches=st.batches, counts=st.counts,
        digest=st.digest, data_digest=st.data_digest, timings=st.timings,
        fs_counts=dict(n_tokens=fs.n_tokens, n_examples_cov=fs.n_examples_cov, n_examples_lambda=fs.n_examples_lambda),
    )

    def write(tmp: Path):
        save_tensors(tensors, tmp / _TENSORS)
        (tmp / _STATE).write_text(json.dumps(state, indent=1))

    atomic_dir(path, write)


def _differences(stored: dict, current: dict) -> list[str]:
    out = []
    for k in sorted(set(stored) | set(current)):
        a, b = stored.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}.{d}" for d in _differences(a, b)]
        elif a != b:
            out.append(f"{k}: {a!r} → {b!r}")
    return out


def load(path: Path, identity: dict, fs: FactorSet, device) -> PassState | None:
    """Restore ``fs`` and the pass state from ``path``; ``None`` when there is no checkpoint there.

    Raises :class:`ResumeError` when the checkpoint was written by a fit with another identity
    (model fingerprint, settings, tracked blocks).
    """
    sp, tp = path / _STATE, path / _TENSORS
    if not sp.exists() or not tp.exists():
        return None
    try:
        state = json.loads(sp.read_text())
        tensors = load_file(str(tp))
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError, ValueError) as e:
        raise ResumeError(f"the checkpoint {path} cannot be read ({e}); delete it (or pass --restart) to start over") from None
    if state.get("version") != CHECKPOINT_VERSION:
        raise ResumeError(f"the checkpoint {path} has format {state.get('version')}, not {CHECKPOINT_VERSION}; pass --restart")
    diff = _differences(state.get("identity", {}), identity)
    if diff:
        raise ResumeError(
            f"the checkpoint {path} belongs to another fit ({'; '.join(diff[:3])}): rerun the interrupted command "
            "unchanged to resume it, or pass --restart to discard it"
        )
    st = PassState(stage=state["stage"], batches=state["batches"], counts=state["counts"], digest=state["digest"],
                   data_digest=state["data_digest"], timings=state.get("timings", {}))
    for key, x in tensors.items():
        x = x.to(device)
        where, rest = key.split("/", 1)
        if where == "acc":
            st.acc[rest] = x
            continue
        fs.set_tensor(rest, x)
    for k, v in state["fs_counts"].items():
        setattr(fs, k, v)
    return st
