"""Bytes each stage holds at once, by component (see :mod:`msif.plan` for what each stage holds)."""

from __future__ import annotations

from .constants import (ACT_PER_TOKEN_D, ACT_PER_TOKEN_F, ATTRIBUTE_CHUNK, CHUNK_ELEMS, CPU_RUNTIME_BYTES, DTYPE_BYTES,
                        EMBED_DIM, EMBED_MAX_TOKENS, EMBEDDER_PARAMS, LOGIT_CHUNK, LOGIT_COPIES, PAD_MULTIPLE,
                        PLAIN_HEAD_TYPES)
from .settings import PlanSettings
from .shape import ModelShape


def dtype_bytes(shape: ModelShape, s: PlanSettings) -> tuple[int, int, int]:
    """Bytes per value of the model, the statistics' sums and the stored eigendecompositions."""
    wb = DTYPE_BYTES[shape.dtype]
    stats = s.stats_dtype or ("float64" if shape.dtype == "float64" else "float32")
    return wb, DTYPE_BYTES[stats], DTYPE_BYTES[s.factor_dtype or stats]


def factor_counts(shape: ModelShape, strategy: str = "ekfac") -> dict[str, int]:
    """Values of each kind of tensor in a factor file: ``A_sum``, ``QA`` (``in_dim²`` per module),
    ``eigA``, ``S_sum``, ``QS`` (``out_b²`` per block), ``eigS``, ``lambda_sum`` (``out × in_dim``)."""
    c = dict.fromkeys(("A_sum", "QA", "eigA", "S_sum", "QS", "eigS", "lambda_sum"), 0)
    for m in shape.modules:
        if strategy in ("ekfac", "kfac"):
            c["A_sum"] += m.in_dim ** 2
            c["QA"] += m.in_dim ** 2
            c["eigA"] += m.in_dim
            for o in m.blocks:
                c["S_sum"] += o * o
                c["QS"] += o * o
                c["eigS"] += o
        if strategy in ("ekfac", "diagonal"):
            c["lambda_sum"] += m.out * m.in_dim
    return c


def factor_bytes(shape: ModelShape, s: PlanSettings, scoring: bool = False) -> int:
    """Bytes of a factor file (``scoring``: without the covariance sums, as loaded for scoring)."""
    _, sb, fb = dtype_bytes(shape, s)
    c = factor_counts(shape, s.strategy)
    sums = 0 if scoring else (c["A_sum"] + c["S_sum"]) * sb
    return sums + c["lambda_sum"] * sb + (c["QA"] + c["eigA"] + c["QS"] + c["eigS"]) * fb


def _activations(shape: ModelShape, B: int, T: int, wb: int, chunked: bool = False, inputs: bool = True) -> dict[str, int]:
    """Autograd's activations of one activation-only backward, the logits' copies (``chunked``: the
    fit's closed-form head gradient) and the tracked inputs ``a`` held until their backward hooks."""
    d, f = shape.hidden, shape.intermediate
    per_tok = shape.layers * (ACT_PER_TOKEN_D * d + ACT_PER_TOKEN_F * f) + 4 * d
    cb = max(wb, 4)  # activations' products are formed in float32 at least
    logits = B * T * shape.vocab
    if chunked and shape.model_type in PLAIN_HEAD_TYPES:
        logits = min(logits, max(1, LOGIT_CHUNK // max(shape.vocab, 1)) * shape.vocab)
    return {
        "activations": B * T * per_tok * wb,
        "logits": LOGIT_COPIES * logits * cb,
        "layer inputs a": B * T * sum(m.in_dim for m in shape.modules) * cb if inputs else 0,
    }


def _per_example_work(shape: ModelShape, B: int, T: int, wb: int) -> int:
    """The largest module's per-sequence work in the Λ pass: rotated ``a`` and ``s`` and a chunk of
    per-sequence gradients with its square."""
    best = 0
    for m in shape.modules:
        step = max(1, CHUNK_ELEMS // (m.out * m.in_dim))
        chunk = min(B, step) * m.out * m.in_dim
        best = max(best, (2 * chunk + B * T * (m.in_dim + 2 * m.out)) * wb)
    return best


def fit_memory(shape: ModelShape, s: PlanSettings, B: int, T: int) -> dict[str, int]:
    """Peak of a fit (the Λ pass for EK-FAC, else the covariance pass), by component."""
    wb, sb, fb = dtype_bytes(shape, s)
    mem = {"runtime": _runtime(s), "weights": shape.n_params * wb, "factors": factor_bytes(shape, s)}
    if s.strategy == "ekfac":
        # eigenbasis rotations cached per module: Q_S stacked (per head) or block-diagonal, Q_A cast
        mem["rotation cache"] = sum(sum(o * o for o in m.blocks) if len(m.blocks) > 1 else m.out ** 2 for m in shape.modules) * wb
        if fb != wb:
            mem["rotation cache"] += sum(m.in_dim ** 2 for m in shape.modules) * wb
    if s.strategy == "identity":
        mem["factors"] = 0
        return mem
    lam = s.strategy in ("ekfac", "diagonal")  # the pass that holds every module's a until its backward hook
    mem.update(_activations(shape, B, T, wb, chunked=True, inputs=lam))
    if lam:
        mem["per-example work"] = _per_example_work(shape, B, T, max(wb, 4))
        mem["Λ copy at the end"] = factor_counts(shape, s.strategy)["lambda_sum"] * sb  # the sums split into blocks
    return mem


def eig_memory(shape: ModelShape, s: PlanSettings) -> int:
    """Float64 workspace of the largest eigendecomposition (input copy, eigenvectors, LAPACK work)."""
    n = max([m.in_dim for m in shape.modules] + [o for m in shape.modules for o in m.blocks])
    return 3 * n * n * 8 if s.strategy in ("ekfac", "kfac") else 0


def _query_vector_bytes(shape: ModelShape, s: PlanSettings, Q: int, rank: int | None) -> int:
    """Held query vectors: ``Q·P`` factor-dtype values, or the low-rank ``X (out, R)``, ``Y (in_dim, R)``
    per module (``R = rank · blocks``; a module where that is not smaller stays dense)."""
    _, _, fb = dtype_bytes(shape, s)
    if rank is None:
        return Q * shape.tracked_params * fb
    tot = 0
    for m in shape.modules:
        R = sum(min(rank, o, m.in_dim) for o in m.blocks)
        tot += min(R * (m.out + m.in_dim), m.out * m.in_dim)
    return Q * tot * fb


def _largest_module(shape: ModelShape) -> int:
    return max((m.out * m.in_dim for m in shape.modules), default=0)


def query_memory(shape: ModelShape, s: PlanSettings, rank: int | None = None) -> dict[str, int]:
    """Both models and both stages' scoring factors, the query vectors ``U`` (allocated once, filled
    module by module), one batch of query gradients (every module, model dtype) and one module's two
    preconditioned copies (``P_ft g``, ``P_pt P_ft g``), as :meth:`Attributor.make_query_vectors` does."""
    wb, _, fb = dtype_bytes(shape, s)
    Q = s.queries
    b = min(Q, s.batch_size)
    return {"runtime": _runtime(s), "weights": 2 * shape.n_params * wb, "factors": 2 * factor_bytes(shape, s, scoring=True),
            "query vectors": _query_vector_bytes(shape, s, Q, rank) + b * shape.tracked_params * wb
            + 2 * b * _largest_module(shape) * fb,
            **_activations(shape, b, s.query_tokens, wb)}


def _released(shape: ModelShape, s: PlanSettings) -> int:
    """What `msif attribute` frees once the query vectors exist (``release``): the fine-tuned model (a
    second copy, also when both are the same folder) and both factor sets."""
    wb, _, _ = dtype_bytes(shape, s)
    return shape.n_params * wb + 2 * factor_bytes(shape, s, scoring=True)


def scoring_memory(shape: ModelShape, s: PlanSettings, B: int, rank: int | None) -> dict[str, int]:
    """Scoring the candidates a chunk at a time (:mod:`msif.influence.stream`) with the pre-trained model.

    Held: runtime, the candidate model, ``U`` and per chunk the running top-k and per-module sums.
    Per batch: autograd's activations, the head's gradient in chunks of ``LOGIT_CHUNK`` logits (the
    candidates' loss uses :func:`msif.objectives.head_gradient` too), every tracked input ``a`` until its
    backward hook, and one module's ``s`` and ``a U`` product. The fine-tuned model and the factors are
    freed before scoring, but glibc keeps their heap pages and hands them to the batch's transients, so
    the resident peak is the larger of the two (``released``), not their sum."""
    wb, _, _ = dtype_bytes(shape, s)
    cb = max(wb, 4)
    T = -(-s.tokens // PAD_MULTIPLE) * PAD_MULTIPLE  # a batch of similar lengths, padded up
    if shape.context:
        T = min(T, shape.context)
    mem = {"runtime": _runtime(s), "weights": shape.n_params * wb,
           "query vectors": _query_vector_bytes(shape, s, s.queries, rank)}
    chunked = shape.model_type in PLAIN_HEAD_TYPES
    tr = _activations(shape, B, T, wb, chunked=chunked)
    tr["candidate grads s"] = B * T * max((m.out for m in shape.modules), default=0) * cb * (1 + min(s.queries, 2))
    n = min(s.candidates or s.documents, ATTRIBUTE_CHUNK)
    mem["results"] = (n + 10) * s.queries * 8 * (2 + len(shape.modules))
    mem.update(tr)
    # freed pages beyond what the batch reuses stay resident
    mem["freed, kept by the allocator"] = max(0, _released(shape, s) - sum(tr.values()))
    return mem


def index_memory(shape: ModelShape, s: PlanSettings) -> dict[str, int]:
    return {"runtime": _runtime(s), "weights": EMBEDDER_PARAMS * 4, "vectors": s.documents * EMBED_DIM * 4,
            "activations": 128 * EMBED_MAX_TOKENS * EMBED_DIM * 4 * 4}


def _runtime(s: PlanSettings) -> int:
    if s.device.startswith("cuda"):
        return 0  # the CUDA device holds only tensors; its context lives in host memory
    return s.runtime_bytes or CPU_RUNTIME_BYTES
