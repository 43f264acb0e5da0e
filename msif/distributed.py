"""Many processes on torch.distributed: `torchrun --nproc-per-node N -m msif fit|attribute|index …`.

msif reads the process group from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``; several nodes through torchrun's rendezvous), uses ``nccl`` on CUDA
and ``gloo`` otherwise, and puts each rank on ``cuda:LOCAL_RANK``. Without torchrun (or with one
process) nothing here does anything and msif runs as a single process.

Work is split by index: rank ``r`` of ``W`` takes batches (fit) or chunks (scoring, embedding)
``r, r + W, r + 2W, …``; every rank still reads every batch, so all ranks agree on the data's digest
and on when a checkpoint is due. Sums are reduced with their counts, so results do not depend on
``W`` (up to the order of floating-point additions). Only rank 0 prints progress and writes final
outputs.

Faults: every collective runs under the process group's timeout (``MSIF_DIST_TIMEOUT`` seconds,
default 1800); a collective that fails (a rank died, raised, or did not answer in time) raises
:class:`DistributedError` naming this rank and the operation, and torchrun stops the other ranks.
Checkpoints and finished shards stay on disk, and rerunning the same command resumes.
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import MsifError
from .data.encoding import InputError

TIMEOUT_ENV = "MSIF_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
BUCKET_ELEMS = 1 << 25  # sums are reduced in flat buckets of at most this many elements


class DistributedError(MsifError, RuntimeError):
    """A collective operation failed: another rank stopped, raised, or timed out."""


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` processes (``local_rank`` on its node)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def mine(self, i: int) -> bool:
        """Item ``i`` (a batch or chunk index, from 0) is this rank's share."""
        return i % self.size == self.rank

    def tag(self) -> str:
        return f"rank {self.rank} of {self.size}"


_WORLD = World()
_BROKEN = False  # a collective failed: the group cannot be torn down cleanly any more


def world() -> World:
    """The current process's :class:`World` (one process unless :func:`init` joined a group)."""
    return _WORLD


def launched() -> bool:
    """Started by torchrun (or any launcher that sets ``WORLD_SIZE`` > 1 and ``RANK``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def timeout_s() -> float:
    try:
        return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        raise InputError(f"{TIMEOUT_ENV} must be a number of seconds, not {os.environ[TIMEOUT_ENV]!r}") from None


def init(device: str = "cpu") -> tuple[World, str]:
    """Join torchrun's process group (once) and return ``(world, this rank's device)``.

    ``device`` ``cuda``/``cuda:N`` becomes ``cuda:LOCAL_RANK`` under torchrun (one GPU per rank).
    Without torchrun: ``(World(), device)`` unchanged.
    """
    global _WORLD
    if not launched():
        return _WORLD, device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = str(device).startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise InputError("--device cuda was asked for, but this machine has no CUDA device; use --device cpu")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s()))
    _WORLD = World(dist.get_rank(), dist.get_world_size(), local)
    return _WORLD, device


def broken() -> bool:
    """A collective has failed in this process (see :func:`exit_now`)."""
    return _BROKEN


def shutdown(success: bool = False) -> None:
    """Leave the process group (after the last collective; not after a failed one, see :func:`exit_now`).
    ``success``: every rank ended the command normally, so all of them reach a last barrier and destroy
    the group together (a rank that tore its group down while a slower peer was still in its own
    teardown could take that peer down with SIGABRT)."""
    global _WORLD
    if dist.is_available() and dist.is_initialized() and not _BROKEN:
        if success and _WORLD.active:
            try:
                dist.barrier()
            except RuntimeError:
                pass
        dist.destroy_process_group()
    _WORLD = World()


def exit_now(code: int) -> None:
    """End the process with ``code`` after a failed collective, without running the process group's
    destructors: with a peer gone they abort the process (SIGABRT, "terminate called without an active
    exception") after the error was printed."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextmanager
def collective(what: str):
    """Turn a failed collective into one :class:`DistributedError` that names this rank and ``what``."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as e:  # torch.distributed.DistBackendError is a RuntimeError
        global _BROKEN
        _BROKEN = True
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(
            f"{_WORLD.tag()}: {what} failed ({cause[:300]}): another rank stopped (see its own message above) or did "
            f"not answer within {timeout_s():.0f} s ({TIMEOUT_ENV}); finished checkpoints and shards are kept, so "
            "rerunning the same command resumes"
        ) from None


def _device() -> torch.device:
    """Where the collectives' buffers live: the rank's GPU for nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree_on_keys(acc: dict[str, torch.Tensor], what: str) -> list[tuple[str, tuple, str]]:
    """The union over ranks of ``acc``'s ``(key, shape, dtype)`` in one order (a rank may lack a key:
    a block that received no gradient in its share of the data)."""
    mine = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in acc.items()}
    every = [None] * _WORLD.size
    with collective(what):
        dist.all_gather_object(every, mine)
    union: dict[str, tuple] = {}
    for d in every:
        for k, sd in d.items():
            if union.setdefault(k, sd) != sd:
                raise DistributedError(f"{_WORLD.tag()}: {what}: ranks disagree on the shape of {k!r} ({union[k]} vs {sd})")
    return [(k, *union[k]) for k in sorted(union)]


def _buckets(keys):
    """Consecutive keys of one dtype in groups of at most :data:`BUCKET_ELEMS` elements."""
    out, cur, n, dt = [], [], 0, None
    for k, shape, dtype in keys:
        size = int(torch.Size(shape).numel())
        if cur and (dtype != dt or n + size > BUCKET_ELEMS):
            out.append(cur)
            cur, n = [], 0
        cur.append((k, shape, dtype))
        n += size
        dt = dtype
    if cur:
        out.append(cur)
    return out


def reduce_sums(acc: dict[str, torch.Tensor], counts: dict[str, int], what: str, to_main: bool = False) -> None:
    """Sum ``acc`` and ``counts`` over the ranks, in place: on every rank (all-reduce), or with
    ``to_main`` on rank 0 only (the other ranks' sums are then emptied, so that a later all-reduce
    counts them once). Keys some ranks lack count as zeros there."""
    if not _WORLD.active:
        return
    keys = _agree_on_keys(acc, what)
    dev = _device()
    for bucket in _buckets(keys):
        dtype = getattr(torch, bucket[0][2])
        parts = []
        for k, shape, _ in bucket:
            x = acc.get(k)
            parts.append(torch.zeros(shape, dtype=dtype, device=dev) if x is None else x.to(dev).reshape(-1))
        flat = torch.cat([p.reshape(-1) for p in parts])
        _sum(flat, to_main, what)
        if to_main and not _WORLD.main:
            continue
        at = 0
        for k, shape, _ in bucket:
            size = int(torch.Size(shape).numel())
            home = acc[k].device if k in acc else dev
            acc[k] = flat[at : at + size].reshape(shape).to(home).clone()
            at += size
    names = sorted(counts)
    c = torch.tensor([int(counts[n]) for n in names], dtype=torch.long, device=dev)
    _sum(c, to_main, what)
    if to_main and not _WORLD.main:
        acc.clear()
        for n in names:
            counts[n] = 0
        return
    for n, v in zip(names, c.tolist()):
        counts[n] = v


def _sum(x: torch.Tensor, to_main: bool, what: str) -> None:
    with collective(what):
        if to_main:
            dist.reduce(x, dst=0)
        else:
            dist.all_reduce(x)


def broadcast_object(obj, what: str, src: int = 0):
    """``obj`` of rank ``src`` on every rank (small, picklable things: states, key lists, errors)."""
    if not _WORLD.active:
        return obj
    box = [obj if _WORLD.rank == src else None]
    with collective(what):
        dist.broadcast_object_list(box, src=src, device=_device())
    return box[0]


def broadcast_tensors(tensors: list[torch.Tensor], what: str, src: int = 0) -> None:
    """Fill ``tensors`` (same shapes and dtypes on every rank, one dtype) in place with rank ``src``'s,
    in flat buckets of at most :data:`BUCKET_ELEMS` elements (a whole factor set is never copied at once)."""
    if not _WORLD.active or not tensors:
        return
    dev = _device()
    keys = [(i, tuple(t.shape), str(t.dtype)) for i, t in enumerate(tensors)]
    for bucket in _buckets(keys):
        group = [tensors[i] for i, _, _ in bucket]
        flat = torch.cat([t.to(dev).reshape(-1) for t in group])
        with collective(what):
            dist.broadcast(flat, src=src)
        if _WORLD.rank == src:
            continue
        at = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[at : at + n].reshape(t.shape))
            at += n


def gather_objects(obj, what: str) -> list | None:
    """Every rank's ``obj`` on rank 0 (in rank order), ``None`` elsewhere."""
    if not _WORLD.active:
        return [obj]
    out = [None] * _WORLD.size if _WORLD.main else None
    with collective(what):
        dist.gather_object(obj, out, dst=0)
    return out


def barrier(what: str) -> None:
    if not _WORLD.active:
        return
    with collective(what):
        dist.barrier()


def split_by_cost(costs: list[float], size: int) -> list[int]:
    """Owner rank of each item, largest first onto the least-loaded rank (balanced eigendecompositions)."""
    load = [0.0] * size
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        r = min(range(size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


# --------------------------------------------------------------------------------------- FSDP
def shard_model(model, device: str = "cpu"):
    """Shard ``model``'s weights across the ranks with FSDP2 (``fully_shard``): each transformer block
    (the classes in ``model._no_split_modules``), the backbone (embeddings, final norm), the output head,
    then the root. Only the weights are sharded: a tracked layer's inputs and output gradients stay
    whole, so the fit's hooks see exactly what they see in one process. Fingerprint the model before
    calling this (the weights become ``DTensor`` shards)."""
    if not _WORLD.active:
        raise InputError("--fsdp shards the model across ranks: launch with torchrun and more than one process")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or [])
    if not blocks:
        raise InputError(f"{type(model).__name__} names no transformer block class (_no_split_modules), so msif "
                         "cannot choose FSDP units for it; run without --fsdp")
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and emb is not None and head.weight is emb.weight:
        raise InputError("--fsdp does not support tied input and output embeddings yet (the head's weight would "
                         "belong to two FSDP units); run without --fsdp")
    base = model.base_model
    if base is model:
        raise InputError(f"--fsdp needs a model with a head on a backbone, not the bare {type(model).__name__}")
    mesh = init_device_mesh("cuda" if str(device).startswith("cuda") else "cpu", (_WORLD.size,))
    for mod in list(model.modules()):
        if type(mod).__name__ in blocks:
            fully_shard(mod, mesh=mesh)
    fully_shard(base, mesh=mesh)
    if head is not None:
        fully_shard(head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model._msif_head_unit = head  # its weight is gathered around the closed-form head gradient
    return model


@contextmanager
def unsharded(module):
    """The whole weights of an FSDP2 unit for use outside its own forward (``module`` ``None`` or not
    sharded: nothing happens)."""
    if module is None or not hasattr(module, "unshard"):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()
