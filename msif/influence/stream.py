"""Corpus-scale scoring in bounded memory: chunks of documents, a running top-k per query, and an
optional resumable store of the whole ``(Q, N)`` score matrix.

The corpus (or one candidate list) is read ``chunk_size`` rows at a time; each chunk is tokenised
and scored (:func:`msif.influence.scoring.score_batches`), merged into a per-query top-k
(:class:`TopK`) and forgotten, so what is held is ``O(Q·(k + chunk))``, never ``O(N)``. With a
:class:`ShardStore` every chunk's scores are also written as one float32 shard (atomically) beside a
manifest that fingerprints the inputs; a rerun reuses the finished shards and refuses a folder whose
inputs differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ..atomic import atomic_write, atomic_write_text
from ..data.encoding import InputError
from ..distributed import barrier, gather_objects, world

MANIFEST = "manifest.json"
SHARD_FORMAT = 1


# ------------------------------------------------------------------------------------------ top-k
class TopK:
    """Per query, the ``k`` best ``(score, row)`` pairs seen so far (float64 scores, on the CPU).

    :meth:`update` merges a chunk by a stable sort of ``[current best ; chunk]``: since chunks come
    in row order (or candidate order), ties keep the earlier candidate first, as one sort of all
    scores would. ``held`` counts the candidates held at once (the memory bound the tests check).
    """

    def __init__(self, n_queries: int, k: int):
        if k < 1:
            raise ValueError("k must be ≥ 1")
        self.k = k
        self.scores = torch.empty(n_queries, 0, dtype=torch.float64, device="cpu")
        self.rows = torch.empty(n_queries, 0, dtype=torch.long, device="cpu")
        self.max_held = 0

    def update(self, scores: torch.Tensor, rows: Sequence[int] | torch.Tensor) -> None:
        """``scores (Q, n)`` of candidates ``rows (n,)`` (the same for every query)."""
        scores = scores.detach().to("cpu", torch.float64)
        rows = torch.as_tensor(rows, dtype=torch.long, device="cpu").expand(scores.shape[0], -1)
        s = torch.cat([self.scores, scores], 1)
        r = torch.cat([self.rows, rows], 1)
        self.max_held = max(self.max_held, s.shape[1])
        order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, : self.k]
        self.scores, self.rows = s.gather(1, order), r.gather(1, order)

    def best(self, q: int) -> tuple[list[int], list[float]]:
        return self.rows[q].tolist(), self.scores[q].tolist()

    @classmethod
    def merged(cls, parts: Sequence[tuple[torch.Tensor, torch.Tensor]], k: int, position: dict[int, int] | None = None) -> "TopK":
        """One top-``k`` from several ``(scores (Q, n_i), rows (Q, n_i))`` over disjoint candidates (the
        ranks' shares), with the ties of one pass over all candidates in order: equal scores keep the
        earlier candidate (``position[row]``, or the row itself) first."""
        out = cls(parts[0][0].shape[0], k)
        s = torch.cat([p[0] for p in parts], 1)
        r = torch.cat([p[1] for p in parts], 1)
        pos = r if position is None else r.clone().apply_(lambda x: position[x])
        by_pos = torch.sort(pos, dim=1, stable=True).indices
        s, r = s.gather(1, by_pos), r.gather(1, by_pos)
        order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
        out.scores, out.rows = s.gather(1, order), r.gather(1, order)
        return out


# ----------------------------------------------------------------------------------- chunk source
@dataclass
class Chunk:
    index: int
    rows: list[int]
    texts: list[str]


def iter_chunks(corpus, rows: Sequence[int] | None, chunk_size: int, skip=lambda i: False) -> Iterator[Chunk]:
    """Chunks of ``chunk_size`` candidates: every document of ``corpus`` in row order (``rows`` None;
    a :class:`~msif.data.corpus.Corpus` is streamed, never read whole) or the given rows in order.
    ``skip(i)``: chunk ``i`` is already done (its texts are not read)."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be ≥ 1")
    if rows is None and hasattr(corpus, "iter_batches"):
        for i, b in enumerate(corpus.iter_batches(chunk_size)):
            yield Chunk(i, list(b.rows), [] if skip(i) else list(b.values))
        return
    n = len(corpus) if rows is None else len(rows)
    for i, a in enumerate(range(0, n, chunk_size)):
        rr = list(range(a, min(a + chunk_size, n))) if rows is None else [int(r) for r in rows[a : a + chunk_size]]
        if skip(i):
            yield Chunk(i, rr, [])
        elif hasattr(corpus, "texts"):
            yield Chunk(i, rr, corpus.texts(rr))
        else:
            yield Chunk(i, rr, [corpus[r] for r in rr])


# ------------------------------------------------------------------------------------ shard store
def fingerprint(inputs: dict) -> str:
    """A short sha256 of a JSON-able description of the inputs."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass
class ShardStore:
    """``DIR/manifest.json`` + ``DIR/shard-00000.safetensors`` …, one shard per chunk.

    A shard holds ``scores (Q, n)`` float32 (the score matrix's columns of its rows), ``rows (n,)``,
    the chunk's own float64 top-k (``topk_scores``, ``topk_rows``) so that a resumed run rebuilds
    exactly the top-k of an uninterrupted one, and ``abs_per_module (Q, M)`` (sums of |per-module
    score|, for the role shares). ``inputs`` describes everything the scores depend on.
    """

    folder: Path
    inputs: dict
    queries: list[dict]
    n_docs: int
    chunk_size: int
    shards: list[str] = field(default_factory=list)
    writer: bool = True  # keeps the manifest (with several ranks: rank 0 only, see :meth:`refresh`)

    @classmethod
    def open(cls, folder, inputs: dict, queries: list[dict], n_docs: int, chunk_size: int, writer: bool = True) -> "ShardStore":
        """Create the folder, or reopen one written with the same inputs (else InputError).
        ``writer=False``: another process keeps the manifest (this one only adds shards)."""
        folder = Path(folder)
        store = cls(folder, inputs, queries, n_docs, chunk_size, writer=writer)
        mpath = folder / MANIFEST
        if mpath.exists():
            try:
                old = json.loads(mpath.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise InputError(f"{mpath} is corrupt ({e}); pass a new --scores-out folder or delete {folder}") from None
            changed = _changed(old.get("inputs", {}), inputs)
            if changed:
                raise InputError(
                    f"{folder} holds scores of other inputs ({changed} changed); pass a new --scores-out folder "
                    f"or delete {folder} to recompute"
                )
        elif folder.exists() and any(folder.iterdir()):
            raise InputError(f"{folder} exists and holds no msif scores manifest; pass a new --scores-out folder")
        folder.mkdir(parents=True, exist_ok=True)
        store.refresh()
        return store

    def refresh(self) -> None:
        """List the shards on disk (every rank's) in the manifest."""
        self.shards = [p.name for p in sorted(self.folder.glob("shard-*.safetensors"))]
        if self.writer:
            self._write_manifest()

    def path(self, i: int) -> Path:
        return self.folder / f"shard-{i:05d}.safetensors"

    def load(self, i: int, rows: Sequence[int]) -> dict | None:
        """The finished shard ``i`` if it exists and covers ``rows`` (else None: recompute it)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        p = self.path(i)
        if not p.exists():
            return None
        try:
            t = load_file(str(p))
        except (SafetensorError, OSError, ValueError):
            return None  # written by someone else or damaged: recompute (the rename makes ours whole)
        if t.get("rows") is None or t["rows"].tolist() != [int(r) for r in rows]:
            return None
        return t

    def save(self, i: int, scores: torch.Tensor, rows: Sequence[int], top: TopK, abs_per_module: torch.Tensor) -> None:
        from safetensors.torch import save_file

        t = {"scores": scores.detach().to("cpu", torch.float32).contiguous(),
             "rows": torch.as_tensor(list(rows), dtype=torch.long, device="cpu"),
             "topk_scores": top.scores.contiguous(), "topk_rows": top.rows.contiguous(),
             "abs_per_module": abs_per_module.detach().to("cpu", torch.float64).contiguous()}
        p = atomic_write(self.path(i), lambda tmp: save_file(t, str(tmp), metadata={"format": str(SHARD_FORMAT)}))
        if p.name not in self.shards:
            self.shards.append(p.name)
            self.shards.sort()
        if self.writer:
            self._write_manifest()

    def _write_manifest(self) -> None:
        m = {"format": SHARD_FORMAT, "fingerprint": fingerprint(self.inputs), "inputs": self.inputs,
             "queries": self.queries, "n_docs": self.n_docs, "chunk_size": self.chunk_size, "dtype": "float32",
             "layout": "shard i: scores (Q, n_i) of rows (n_i,), queries in manifest order", "shards": self.shards}
        atomic_write_text(self.folder / MANIFEST, json.dumps(m, indent=1, default=str))


def _changed(old: dict, new: dict) -> str:
    """Names of the inputs that differ (empty when none do)."""
    keys = [k for k in sorted(set(old) | set(new)) if json.dumps(old.get(k), sort_keys=True, default=str)
            != json.dumps(new.get(k), sort_keys=True, default=str)]
    return ", ".join(keys)


# ------------------------------------------------------------------------------------ precision
def precision_report(low: torch.Tensor, high: torch.Tensor, dtype: str, min_spearman: float = 0.9) -> dict:
    """Compare scores ``(Q, n)`` of a low-precision model with float32 ones: the worst Spearman over
    queries, the max relative error ``max|low − high| / max|high|``, and a one-line warning when the
    Spearman is below ``min_spearman`` (else ``warning`` is None)."""
    from scipy.stats import spearmanr

    lo, hi = low.detach().to("cpu", torch.float64), high.detach().to("cpu", torch.float64)
    rhos = []
    for q in range(lo.shape[0]):
        rho = spearmanr(lo[q].numpy(), hi[q].numpy()).statistic if lo.shape[1] > 1 else 1.0
        rhos.append(1.0 if rho != rho else float(rho))  # constant scores: nothing to rank
    rel = float((lo - hi).abs().max() / hi.abs().max().clamp_min(1e-300))
    rho = min(rhos)
    warning = None
    if rho < min_spearman:
        warning = (f"warning: {dtype} scores disagree with float32 on the first {lo.shape[1]} candidates (Spearman {rho:.2f}, "
                   f"max relative error {rel:.2g}); the ranking is unreliable, pass --dtype float32")
    return {"spearman": rho, "max_rel_error": rel, "n": int(lo.shape[1]), "warning": warning}


# ------------------------------------------------------------------------------------ memory budget
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """``"8GB"`` → 8·10⁹, ``"512MiB"`` → 512·2²⁰, ``"1e9"`` → 10⁹."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise InputError(f"--max-memory must be a size like 8GB, 512MiB or 2e9 (bytes), not {text!r}")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise InputError(f"--max-memory must be positive, not {text!r}")
    return n


def available_memory(device) -> int:
    """Free bytes where the query vectors live: CUDA's free memory, else the machine's available RAM."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def default_max_memory(device) -> int:
    """A quarter of :func:`available_memory`: the default budget of the query vectors."""
    return available_memory(device) // 4


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# ------------------------------------------------------------------------------- the stream
def open_store(folder, inputs, queries, n, chunk_size):
    """The score-shard folder; with several ranks rank 0 creates it first and alone keeps its manifest."""
    w = world()
    store = ShardStore.open(folder, inputs, queries, n, chunk_size) if w.main else None
    barrier("opening the score shards")
    if not w.main:
        store = ShardStore.open(folder, inputs, queries, n, chunk_size, writer=False)
    return store


def stream_top_k(score, corpus, rows, n_queries, k, chunk_size, store, progress):
    """Top-``k`` per query over ``rows`` of ``corpus`` (``None``: all), chunk by chunk, and the sums
    of |per-module score| ``(Q, M)``; ``score(texts)`` gives a chunk's :class:`ScoreResult`.
    Chunks already in ``store`` are read back, new ones written to it; with several ranks each
    scores its own chunks and rank 0 gets the merged result (the others get ``(None, None)``)."""
    import sys

    from tqdm.auto import tqdm

    best = TopK(n_queries, k)
    absm = None
    cached = {}
    w = world()
    total = len(corpus) if rows is None else len(rows)
    bar = tqdm(total=total, unit="doc", desc="scoring", file=sys.stderr, disable=not progress, dynamic_ncols=True,
               smoothing=0.1)

    def skip(i):  # another rank's chunk, or one already in the store: its texts are not read
        return not w.mine(i) or (store is not None and _cached(store, i, cached))

    try:
        for chunk in iter_chunks(corpus, rows, chunk_size, skip=skip):
            if not w.mine(chunk.index):
                continue
            shard = cached.pop(chunk.index, None)
            if shard is not None and shard["rows"].tolist() == chunk.rows:
                part_s, part_r, chunk_abs = shard["topk_scores"], shard["topk_rows"], shard["abs_per_module"]
            else:
                if not chunk.texts:  # a cached shard that did not match its rows after all
                    chunk.texts = list(corpus.texts(chunk.rows)) if hasattr(corpus, "texts") else [corpus[r] for r in chunk.rows]
                res = score(chunk.texts)
                part = TopK(n_queries, k)
                part.update(res.scores, chunk.rows)
                part_s, part_r = part.scores, part.rows
                chunk_abs = res.per_module.abs().sum(1).to("cpu", torch.float64)
                if store is not None:
                    store.save(chunk.index, res.scores, chunk.rows, part, chunk_abs)
                del res
            best.update(part_s, part_r)
            best.max_held = max(best.max_held, len(chunk.rows) + k)
            absm = chunk_abs.clone() if absm is None else absm + chunk_abs
            bar.update(min(len(chunk.rows) * w.size, total - bar.n))  # rank 0's share stands for every rank's
    finally:
        bar.close()
    if not w.active:
        return best, absm
    parts = gather_objects((best.scores, best.rows, best.max_held, absm), "collecting the ranks' top documents")
    if not w.main:
        return None, None
    position = None if rows is None else {int(r): i for i, r in enumerate(rows)}
    merged = TopK.merged([(sc, rw) for sc, rw, _, _ in parts], k, position)
    merged.max_held = max(h for _, _, h, _ in parts)
    absm = sum(a for *_, a in parts if a is not None)
    return merged, absm


def _cached(store, i, cached) -> bool:
    """Chunk ``i``'s shard exists (kept in ``cached`` for the loop; its rows are checked there)."""
    p = store.path(i)
    if not p.exists():
        return False
    from safetensors.torch import load_file

    try:
        cached[i] = load_file(str(p))
    except Exception:  # noqa: BLE001  (damaged or foreign: recompute)
        return False
    return "rows" in cached[i] and "topk_rows" in cached[i]
