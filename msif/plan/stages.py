"""The plan: every stage's memory, work and time, and the batch size and rank that fit the device."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

from ..data.encoding import InputError
from ..distributed import BUCKET_ELEMS
from .constants import EMBED_MAX_TOKENS, EMBEDDER_PARAMS, NOMINAL_FLOPS
from .flops import fit_flops, query_flops, scoring_flops, train_flops
from .memory import (dtype_bytes, eig_memory, factor_bytes, factor_counts, fit_memory, index_memory, query_memory,
                     scoring_memory)
from .report import fmt_bytes
from .settings import PlanSettings
from .shape import ModelShape


@dataclass
class Stage:
    name: str
    memory: dict[str, int]
    flops: float
    passes: int
    sequences: int
    time_s: float = 0.0
    note: str = ""

    @property
    def peak(self) -> int:
        return sum(self.memory.values())


def default_device_memory(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA device is visible; pass --device-memory BYTES to plan for one")
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _throughput(s: PlanSettings, dtype: str) -> float:
    if s.device.startswith("cuda"):
        return NOMINAL_FLOPS["cuda"]["float32" if dtype in ("float32", "float64") else "other"]
    return NOMINAL_FLOPS["cpu"]


def seq_len(shape: ModelShape, s: PlanSettings) -> int:
    T = s.seq_len or math.ceil(1.05 * s.tokens)  # batches are sorted by length within a window
    return min(T, shape.context) if shape.context else T


def make_plan(shape: ModelShape, s: PlanSettings, throughput: dict | None = None) -> dict:
    """Every stage's memory (by component), work and time, and the recommended batch size and rank."""
    s.validate()
    thr = throughput or {}
    fit_tp = thr.get("fit", _throughput(s, shape.dtype))
    train_tp = thr.get("train", fit_tp)
    T = seq_len(shape, s)
    n_pt = min(s.fit_examples or s.documents, s.documents)
    stages = []
    W = s.world_size  # every rank holds the model and the factors: memory is per rank, time is split W ways
    ranks = f"; per rank, {W} ranks" if W > 1 else ""
    for name, n, t in (("fit pt", n_pt, T), ("fit ft", s.finetune_examples, s.finetune_tokens)):
        w = fit_flops(shape, s, n, t)
        mem = fit_memory(shape, s, s.batch_size, t)
        if W > 1:  # the sums are reduced in flat buckets (a copy of one bucket at a time)
            c = factor_counts(shape, s.strategy)
            mem["reduce buckets"] = 2 * min(BUCKET_ELEMS, c["A_sum"] + c["S_sum"] + c["lambda_sum"]) * dtype_bytes(shape, s)[1]
        stages.append(Stage(name, mem, w["flops"], w["passes"], n, w["flops"] / fit_tp / W,
                            note=f"eigendecomposition workspace {fmt_bytes(eig_memory(shape, s))} (float64, one matrix at a time){ranks}"))
    qf = query_flops(shape, s)  # made on every rank
    stages.append(Stage("query vectors", query_memory(shape, s, s.rank), qf, 1, s.queries, qf / fit_tp))
    sf = scoring_flops(shape, s, s.rank)
    n_c = s.candidates or s.documents
    stages.append(Stage("scoring", scoring_memory(shape, s, s.batch_size, s.rank), sf, 1, n_c, sf / fit_tp / W, note=ranks[2:]))
    ef = 2.0 * EMBEDDER_PARAMS * s.documents * min(s.tokens, EMBED_MAX_TOKENS)
    stages.append(Stage("index", index_memory(shape, s), ef, 1, s.documents, ef / thr.get("embed", fit_tp) / W, note=ranks[2:]))
    budget = s.device_memory or default_device_memory(s.device)
    baseline = train_flops(shape, T) * n_pt / train_tp
    return {
        "model": s.model,
        "shape": {**{k: v for k, v in asdict(shape).items() if k != "modules"},
                  "tracked_modules": len(shape.modules), "blocks": sum(len(m.blocks) for m in shape.modules),
                  "tracked_params": shape.tracked_params},
        "settings": {k: v for k, v in asdict(s).items()},
        "seq_len": T,
        "factor_bytes": factor_bytes(shape, s),
        "scoring_factor_bytes": factor_bytes(shape, s, scoring=True),
        "factor_counts": factor_counts(shape, s.strategy),
        "eig_workspace_bytes": eig_memory(shape, s),
        "throughput_flops": {"fit": fit_tp, "train": train_tp, "calibrated": bool(thr)},
        "train_pass_s": baseline,
        "stages": [dict(name=st.name, peak_bytes=st.peak, memory=st.memory, flops=st.flops, passes=st.passes,
                        sequences=st.sequences, time_s=st.time_s, note=st.note) for st in stages],
        "device_memory": budget,
        "recommend": recommend(shape, s, budget),
    }


def recommend(shape: ModelShape, s: PlanSettings, budget: int) -> dict:
    """Largest batch size whose fit and scoring peaks fit in 90% of ``budget``, and the query rank:
    dense when ``Q`` dense vectors fit beside scoring, else the largest power of two that does."""
    room = int(0.9 * budget)
    T = seq_len(shape, s)

    def fits_fit(B):
        return sum(fit_memory(shape, s, B, T).values()) <= room

    def fits_score(B, r):
        return sum(scoring_memory(shape, s, B, r).values()) <= room and sum(query_memory(shape, s, r).values()) <= room

    fit_b = _largest(fits_fit)
    rank = None
    if not fits_score(1, None):
        rank = next((r for r in (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1) if fits_score(1, r)), 0)
    score_b = _largest(lambda B: fits_score(B, rank or None)) if rank != 0 else 0
    out = {"fit_batch_size": fit_b, "score_batch_size": score_b, "rank": rank, "budget_bytes": room}
    if fit_b == 0 or score_b == 0 or rank == 0:
        out["warning"] = "does not fit in the device memory even at batch size 1 (and rank 1): use a larger device, fewer queries or --modules mlp"
    return out


def _largest(ok, hi: int = 1024) -> int:
    if not ok(1):
        return 0
    lo = 1
    while lo * 2 <= hi and ok(lo * 2):
        lo *= 2
    return lo
