"""``msif plan``: memory, work and time of every stage for a model, before its weights are loaded.

The model is built on the meta device from its config (no weights read), its tracked layers come from
the adapter, and each stage's peak memory is the sum of what that stage holds at once:

* **fit** (per stage, pt and ft): runtime + weights + the factor tensors being accumulated (Λ pass:
  everything the factor file holds, plus the eigenbasis rotations cached per module) + autograd's
  activations of one batch (what an activation-only backward keeps, and ``LOGIT_COPIES`` copies of the
  ``B·T·V`` logits: the logits, log-softmax, its gradient and the logits' gradient) + the inputs ``a`` of
  every tracked module (kept until its backward hook fires) + one module's per-example work (per-sequence
  gradients, chunked to ``2**26`` elements, and their squares). The eigendecomposition is float64, one
  matrix at a time.
* **query vectors**: both models + both stages' scoring factors (eigenvectors, eigenvalues, Λ) + ``U``
  + one batch of query gradients + one module's two preconditioned copies.
* **scoring** (streamed, the factors and fine-tuned model released): the candidate model + the query
  vectors ``U`` (dense ``Q·P`` values, or low-rank ``r·(out+in_dim)`` per block) + one batch of
  candidate activations (the head's gradient chunked as in the fit) + one chunk's results; what was
  released stays resident as far as the batch does not reuse it (glibc keeps freed heap pages).
* **index**: the sentence-embedding model + one float32 vector per document.

Work is counted in FLOPs (``2·params`` per token forward, the attention products, the statistics'
matrix products, ``9 n³`` per eigendecomposition) and data passes; time is FLOPs over a throughput,
nominal or measured by :func:`calibrate` on a few real batches.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field

from .data.encoding import InputError
from .distributed import BUCKET_ELEMS

#: copies of the ``(B, T, V)`` logits alive at once in a backward through the model's own head (logits,
#: log-softmax saved by cross-entropy, the gradient of the log-softmax output, the gradient of the logits);
#: a fit of a plain-head LM forms them in chunks of ``LOGIT_CHUNK`` elements instead (logits, softmax,
#: its cumulative sum for the sampled labels, the log-sum-exp temporary: also four copies)
LOGIT_COPIES = 4
LOGIT_CHUNK = 1 << 24  # msif.objectives.LOGIT_CHUNK
#: float values autograd keeps per token and layer for an activation-only backward of a GPT-style
#: block, in units of the hidden size ``d`` (layer-norm inputs, q/k/v before and after the rotary
#: embedding, attention output, the tracked outputs the hooks hold) plus one MLP width ``f`` (GELU input)
ACT_PER_TOKEN_D, ACT_PER_TOKEN_F = 11, 1
#: RSS of the Python + torch + transformers + msif runtime, tokenizer and data besides the model's
#: weights: RSS at the start of `msif fit`'s covariance pass minus the weights, measured on the Pythia-70m
#: probe (benchmarks/probe.py; 519 MB − 269 MB, torch CPU, transformers 5). The older 410 MB was the
#: peak of a whole small command, allocator caching included.
CPU_RUNTIME_BYTES = 250 * 2**20
#: candidate batches are right-padded to a multiple of this many tokens (msif.influence.attribute.PAD_MULTIPLE)
PAD_MULTIPLE = 32
#: documents `msif attribute` reads, tokenises and scores at a time (its --chunk-size default)
ATTRIBUTE_CHUNK = 1024
#: elements of per-sequence gradients formed at once (msif.curvature.fit._CHUNK_ELEMS)
CHUNK_ELEMS = 1 << 26
#: nominal throughputs (FLOP/s) when not calibrated
NOMINAL_FLOPS = {"cpu": 2.0e10, "cuda": {"float32": 2.0e13, "other": 1.5e14}}
#: all-MiniLM-L6-v2: parameters, embedding width, tokens per text it reads at most
EMBEDDER_PARAMS, EMBED_DIM, EMBED_MAX_TOKENS = 22_713_216, 384, 256
#: architectures whose fit forms the head's gradient in closed form (msif.objectives.PLAIN_HEAD_TYPES)
PLAIN_HEAD_TYPES = ("gpt_neox", "gpt2", "llama", "mistral", "qwen2", "qwen3", "bloom", "opt")
DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class PlanSettings:
    """What is planned: the corpus, queries and the settings of `msif fit` / `msif attribute`."""

    model: str
    documents: int = 10_000
    tokens: int = 512  # mean tokens per pre-training document
    seq_len: int | None = None  # padded batch length (default: min(context, 1.05 × tokens))
    queries: int = 1
    dtype: str = "auto"  # the model's dtype (auto: the config's, else float32)
    batch_size: int = 8
    device: str = "cpu"
    device_memory: int | None = None  # bytes (default: this machine's RAM, or the CUDA device's memory)
    strategy: str = "ekfac"
    modules: str = "all"
    per_head: bool = True
    stats_dtype: str | None = None  # sums (default float32; float64 for a float64 model)
    factor_dtype: str | None = None  # eigenvectors / eigenvalues (default: the stats dtype)
    rank: int | None = None
    refine: int = 0
    fit_examples: int | None = None  # pre-training documents the pt fit reads (default: all)
    finetune_examples: int = 1_000
    finetune_tokens: int = 64
    query_tokens: int = 32
    candidates: int | None = None  # documents scored per query group (default: all)
    generic: bool = False
    runtime_bytes: int | None = None  # resident memory of the runtime before the model (CPU; default measured constant)
    world_size: int = 1  # ranks (torchrun): data passes, eigendecompositions, scoring and embedding split W ways

    def validate(self) -> "PlanSettings":
        for name in ("documents", "tokens", "queries", "batch_size", "finetune_examples", "finetune_tokens", "query_tokens",
                     "world_size"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be a positive number, not {getattr(self, name)}")
        for name in ("seq_len", "device_memory", "rank", "fit_examples", "candidates"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise InputError(f"--{name.replace('_', '-')} must be a positive number, not {v}")
        if self.refine < 0:
            raise InputError(f"--refine-basis must be ≥ 0, not {self.refine}")
        from .curvature.factors import STRATEGIES

        if self.strategy not in STRATEGIES:
            raise InputError(f"--strategy must be one of {', '.join(STRATEGIES)}, not {self.strategy!r}")
        for name in ("stats_dtype", "factor_dtype"):
            v = getattr(self, name)
            if v is not None and v not in ("float32", "float64"):
                raise InputError(f"--{name.replace('_', '-')} must be float32 or float64, not {v!r}")
        if self.dtype != "auto" and _dtype_name(self.dtype) not in DTYPE_BYTES:
            raise InputError(f"--dtype must be auto, float32, float64, bfloat16 or float16, not {self.dtype!r}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise InputError(f"--device must be cpu or cuda, not {self.device!r}")
        return self


def _dtype_name(x) -> str:
    s = str(x).removeprefix("torch.")
    return {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32", "double": "float64"}.get(s, s)


@dataclass
class ModuleShape:
    name: str
    role: str
    in_dim: int
    out: int
    blocks: list[int]  # out_dim of each block
    bias: bool = False  # in_dim counts the bias column


@dataclass
class ModelShape:
    """What the plan needs of a model: sizes from its config and its tracked layers."""

    model_type: str
    n_params: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    context: int | None
    dtype: str
    modules: list[ModuleShape] = field(default_factory=list)

    @property
    def tracked_params(self) -> int:
        """P: entries of every tracked ``(out, in_dim)`` matrix (weights and bias columns)."""
        return sum(m.out * m.in_dim for m in self.modules)


def model_shape(model, settings: PlanSettings | None = None) -> ModelShape:
    """The :class:`ModelShape` of a model (real or on the meta device) with its tracked layers."""
    from .models.adapters import tracked_modules

    s = settings or PlanSettings(model="")
    tms = tracked_modules(model, per_head=s.per_head, modules=s.modules, generic=s.generic)
    cfg = model.config
    g = lambda *names: next((getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None), None)  # noqa: E731
    hidden = g("hidden_size", "n_embd", "d_model") or 0
    # transformers ≥ 4.56 names it ``dtype`` (``torch_dtype`` is a deprecated alias that warns on access)
    cfg_dtype = vars(cfg).get("dtype") if "dtype" in vars(cfg) else getattr(cfg, "torch_dtype", None)
    dtype = _dtype_name(cfg_dtype) if s.dtype == "auto" and cfg_dtype is not None else (
        "float32" if s.dtype == "auto" else _dtype_name(s.dtype))
    if model.device.type != "meta":
        dtype = _dtype_name(next(model.parameters()).dtype) if s.dtype == "auto" else dtype
    return ModelShape(
        model_type=getattr(cfg, "model_type", type(model).__name__),
        n_params=sum(p.numel() for p in model.parameters()),
        hidden=hidden,
        layers=g("num_hidden_layers", "n_layer", "num_layers") or 0,
        heads=g("num_attention_heads", "n_head") or 1,
        intermediate=g("intermediate_size", "n_inner", "ffn_dim") or 4 * hidden,
        vocab=g("vocab_size") or 0,
        context=g("max_position_embeddings", "n_positions"),
        dtype=dtype,
        modules=[ModuleShape(t.name, t.role, t.in_dim, t.out_features, [b.out_dim for b in t.blocks], bool(t.bias))
                 for t in tms],
    )


def load_shape(settings: PlanSettings) -> ModelShape:
    """Read MODEL's config (a local folder) and build the model on the meta device: no weights are read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.path.expanduser(settings.model)
    if not os.path.isdir(path):
        raise InputError(f"no such model folder: {settings.model!r} (msif plan reads a local checkpoint folder's config.json)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise InputError(f"{settings.model!r} has no config.json, so it is not a Hugging Face checkpoint folder")
    try:
        cfg = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"cannot read the config of {settings.model!r}: {e}") from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except (ValueError, KeyError) as e:
        raise InputError(f"transformers cannot build a causal LM from the config of {settings.model!r}: {e}") from None
    return model_shape(model, settings)


# ------------------------------------------------------------------------------------------------ bytes
def _dtypes(shape: ModelShape, s: PlanSettings) -> tuple[int, int, int]:
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
    _, sb, fb = _dtypes(shape, s)
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
    wb, sb, fb = _dtypes(shape, s)
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
    _, _, fb = _dtypes(shape, s)
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
    wb, _, fb = _dtypes(shape, s)
    Q = s.queries
    b = min(Q, s.batch_size)
    return {"runtime": _runtime(s), "weights": 2 * shape.n_params * wb, "factors": 2 * factor_bytes(shape, s, scoring=True),
            "query vectors": _query_vector_bytes(shape, s, Q, rank) + b * shape.tracked_params * wb
            + 2 * b * _largest_module(shape) * fb,
            **_activations(shape, b, s.query_tokens, wb)}


def _released(shape: ModelShape, s: PlanSettings) -> int:
    """What `msif attribute` frees once the query vectors exist (``release``): the fine-tuned model (a
    second copy, also when both are the same folder) and both factor sets."""
    wb, _, _ = _dtypes(shape, s)
    return shape.n_params * wb + 2 * factor_bytes(shape, s, scoring=True)


def scoring_memory(shape: ModelShape, s: PlanSettings, B: int, rank: int | None) -> dict[str, int]:
    """Scoring the candidates a chunk at a time (:mod:`msif.influence.stream`) with the pre-trained model.

    Held: runtime, the candidate model, ``U`` and per chunk the running top-k and per-module sums.
    Per batch: autograd's activations, the head's gradient in chunks of ``LOGIT_CHUNK`` logits (the
    candidates' loss uses :func:`msif.objectives.head_gradient` too), every tracked input ``a`` until its
    backward hook, and one module's ``s`` and ``a U`` product. The fine-tuned model and the factors are
    freed before scoring, but glibc keeps their heap pages and hands them to the batch's transients, so
    the resident peak is the larger of the two (``released``), not their sum."""
    wb, _, _ = _dtypes(shape, s)
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


# ------------------------------------------------------------------------------------------------ FLOPs
def forward_flops(shape: ModelShape, T: int) -> float:
    """FLOPs of one forward of a ``T``-token sequence: ``2·(P + d·V)`` per token plus ``4·T·d`` per
    token and layer for the attention products."""
    return T * (2 * (shape.tracked_params + shape.hidden * shape.vocab) + 4 * T * shape.hidden * shape.layers)


def train_flops(shape: ModelShape, T: int) -> float:
    """A training step (forward + backward with parameter gradients): three forwards."""
    return 3 * forward_flops(shape, T)


def _stats_flops(shape: ModelShape, T: int, pass_: str) -> float:
    """Per sequence: covariance products, or (Λ pass) rotations + per-sequence gradients + squares."""
    from .curvature.fit import gram_flops

    tot = 0.0
    for m in shape.modules:
        if pass_ == "cov":
            tot += gram_flops(T, m.in_dim - m.bias)  # the bias column enters as a sum, not a product
            tot += sum(gram_flops(T, o) for o in m.blocks)
        else:
            rot = 2 * T * (m.in_dim ** 2 + sum(o * o for o in m.blocks))
            tot += rot + 2 * T * m.out * m.in_dim + 2 * m.out * m.in_dim
    return tot


def fit_flops(shape: ModelShape, s: PlanSettings, n: int, T: int) -> dict[str, float]:
    """Work of a fit on ``n`` sequences of ``T`` tokens: passes and FLOPs (forward + activation backward
    ≈ two forwards per pass, plus the statistics and the eigendecompositions)."""
    pass_f = 2 * forward_flops(shape, T)
    passes = {"ekfac": 2, "kfac": 1, "diagonal": 1, "identity": 0}[s.strategy] + s.refine
    fl = 0.0
    if s.strategy in ("ekfac", "kfac"):
        fl += n * (pass_f + _stats_flops(shape, T, "cov"))
    if s.strategy in ("ekfac", "diagonal"):
        fl += n * (pass_f + _stats_flops(shape, T, "lam"))
    fl += s.refine * n * (pass_f + 2 * _stats_flops(shape, T, "lam"))
    eig = 0.0
    if s.strategy in ("ekfac", "kfac"):
        eig = 9.0 * sum(m.in_dim ** 3 + sum(o ** 3 for o in m.blocks) for m in shape.modules) * (1 + s.refine)
    return {"passes": passes, "flops": fl + eig, "eig_flops": eig}


def scoring_flops(shape: ModelShape, s: PlanSettings, rank: int | None) -> float:
    """Forward + activation backward per candidate, plus the contraction with the ``Q`` query vectors."""
    T, Q = s.tokens, s.queries
    con = 0.0
    for m in shape.modules:
        if rank is not None:
            con += 2 * Q * T * sum(min(rank, o) for o in m.blocks) * (m.out + m.in_dim)
        else:
            con += 2 * m.out * m.in_dim * (Q * T if Q == 1 else T + Q)
    return (s.candidates or s.documents) * (2 * forward_flops(shape, T) + con)


def query_flops(shape: ModelShape, s: PlanSettings) -> float:
    pre = sum(4 * (o * o * m.in_dim + o * m.in_dim ** 2) for m in shape.modules for o in m.blocks)
    grads = 2 * s.query_tokens * shape.tracked_params
    return s.queries * (2 * forward_flops(shape, s.query_tokens) + grads + 2 * pre)


# ------------------------------------------------------------------------------------------------ plan
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
            mem["reduce buckets"] = 2 * min(BUCKET_ELEMS, c["A_sum"] + c["S_sum"] + c["lambda_sum"]) * _dtypes(shape, s)[1]
        stages.append(Stage(name, mem, w["flops"], w["passes"], n, w["flops"] / fit_tp / W,
                            note=f"eigendecomposition workspace {_fmt(eig_memory(shape, s))} (float64, one matrix at a time){ranks}"))
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


# ------------------------------------------------------------------------------------------- calibration
def corpus_stats(path: str, tokenizer_dir: str | None, text_field: str = "text", sample: int = 256) -> tuple[int, int]:
    """(documents, mean tokens per document) of a corpus, tokens estimated from an evenly spaced sample
    (the model's tokenizer when the folder has one, else 1.3 tokens per word)."""
    from .data.corpus import Corpus

    corp = Corpus(path, text_field=text_field)
    n = len(corp)
    if n == 0:
        raise InputError(f"the corpus {path} holds no documents")
    rows = sorted({int(i * n / min(n, sample)) for i in range(min(n, sample))})
    texts = corp.texts(rows)
    tok = None
    if tokenizer_dir and os.path.isfile(os.path.join(tokenizer_dir, "tokenizer_config.json")):
        from .models.loading import load_tokenizer

        tok = load_tokenizer(tokenizer_dir)
    if tok is not None:
        lens = [len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts]
    else:
        lens = [max(2, round(1.3 * len(t.split()))) for t in texts]
    return n, max(2, round(sum(lens) / len(lens)))


def calibrate(shape: ModelShape, s: PlanSettings, repeats: int = 2) -> dict:
    """Measured throughputs (FLOP/s) of a plain training step and a fit batch on this machine, and the
    runtime's resident memory before the model is loaded. The model is loaded from the folder (random
    init from its config when it holds no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .curvature.hooks import record_batch
    from .data.encoding import Batch
    from .models.adapters import tracked_modules
    from .objectives import curvature_targets, data_targets, model_logits, summed_loss

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    dt = getattr(torch, shape.dtype)
    path = os.path.expanduser(s.model)
    has_weights = any(f.endswith((".safetensors", ".bin")) for f in os.listdir(path))
    if has_weights:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt)
    else:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)).to(dt)
    model.to(s.device).eval()
    B, T = min(s.batch_size, 8), min(seq_len(shape, s), 256)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, shape.vocab, (B, T), generator=g).to(s.device)
    mask = torch.ones_like(ids)
    tm = torch.ones_like(ids, dtype=torch.bool)
    tm[:, -1] = False
    batch = Batch(ids, mask, tm, None, torch.arange(B))
    tms = tracked_modules(model, per_head=s.per_head, modules=s.modules, generic=s.generic)

    def sync():
        if s.device.startswith("cuda"):
            torch.cuda.synchronize()

    def train():
        model.zero_grad(set_to_none=True)
        summed_loss(model_logits(model, batch), data_targets(batch, "lm")).sum().backward()
        model.zero_grad(set_to_none=True)

    def fit_batch():
        a, s_, _ = record_batch(model, tms, batch, lambda lg: curvature_targets(lg, batch, "lm", "sampled", 0, 0))
        for t in tms:
            x = a[t.name].reshape(-1, t.in_dim)
            _ = x.T @ x
            y = s_[t.name].reshape(-1, t.out_features)
            _ = y.T @ y

    def best(fn):
        fn()
        sync()
        out = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync()
            out = min(out, time.perf_counter() - t0)
        return out

    t_train, t_fit = best(train), best(fit_batch)
    fit_f = B * (2 * forward_flops(shape, T) + _stats_flops(shape, T, "cov"))
    return {"train": B * train_flops(shape, T) / t_train, "fit": fit_f / t_fit, "train_step_s": t_train,
            "fit_batch_s": t_fit, "batch": [B, T], "runtime_bytes": rss0, "weights_loaded": has_weights}


# ------------------------------------------------------------------------------------------------ output
def _fmt(n: float) -> str:
    for unit, k in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{int(n)} B"


def _fmt_s(t: float) -> str:
    if t >= 3600:
        return f"{t / 3600:.1f} h"
    if t >= 60:
        return f"{t / 60:.1f} min"
    return f"{t:.1f} s"


def format_plan(p: dict) -> str:
    """The plan as a text table: one row per stage, then each stage's memory components."""
    sh = p["shape"]
    lines = [
        f"model {p['model']}: {sh['model_type']}, {sh['n_params'] / 1e6:.1f}M parameters ({sh['dtype']}), "
        f"{sh['tracked_modules']} tracked layers in {sh['blocks']} blocks, P = {sh['tracked_params'] / 1e6:.1f}M tracked",
        f"corpus: {p['settings']['documents']} documents × {p['settings']['tokens']} tokens (batches padded to {p['seq_len']}); "
        f"{p['settings']['queries']} queries; factors {_fmt(p['factor_bytes'])} per stage on disk, "
        f"{_fmt(p['scoring_factor_bytes'])} loaded for scoring",
        "",
        f"{'stage':<14} {'peak memory':>12} {'weights':>10} {'factors':>10} {'activations':>12} {'query vec.':>11} "
        f"{'TFLOP':>9} {'passes':>6} {'time':>9}",
    ]
    for st in p["stages"]:
        m = st["memory"]
        act = sum(v for k, v in m.items() if k in ("activations", "logits", "layer inputs a", "per-example work", "candidate grads s"))
        lines.append(f"{st['name']:<14} {_fmt(st['peak_bytes']):>12} {_fmt(m.get('weights', 0)):>10} "
                     f"{_fmt(m.get('factors', 0) + m.get('rotation cache', 0)):>10} {_fmt(act):>12} "
                     f"{_fmt(m.get('query vectors', 0)):>11} {st['flops'] / 1e12:>9.2f} {st['passes']:>6} {_fmt_s(st['time_s']):>9}")
    tp = p["throughput_flops"]
    lines += ["", f"time at {tp['fit'] / 1e9:.0f} GFLOP/s ({'measured' if tp['calibrated'] else 'nominal; --calibrate measures it'}); "
              f"a plain training pass over the pt fit data: {_fmt_s(p['train_pass_s'])}", ""]
    for st in p["stages"]:
        parts = ", ".join(f"{k} {_fmt(v)}" for k, v in st["memory"].items() if v)
        lines.append(f"{st['name']}: {parts}" + (f"; {st['note']}" if st["note"] else ""))
    r = p["recommend"]
    if "warning" in r:  # a batch size of 0 or a rank of 0 is no recommendation
        lines += ["", f"for {_fmt(p['device_memory'])} of device memory: " + r["warning"]]
    else:
        lines += ["", f"for {_fmt(p['device_memory'])} of device memory: fit --batch-size {r['fit_batch_size']}, "
                  f"attribute --batch-size {r['score_batch_size']}, "
                  + (f"--rank {r['rank']}" if r["rank"] else "dense query vectors (no --rank needed)")]
    return "\n".join(lines)


def run(s: PlanSettings, corpus: str | None = None, do_calibrate: bool = False, text_field: str = "text",
        estimate_tokens: bool = True) -> dict:
    """Read the model's shape (and the corpus's size), optionally calibrate, and make the plan."""
    s.validate()
    shape = load_shape(s)
    if corpus is not None:
        n, t = corpus_stats(corpus, os.path.expanduser(s.model), text_field)
        s.documents, s.tokens = n, (t if estimate_tokens else s.tokens)
    thr = None
    cal = None
    if do_calibrate:
        cal = calibrate(shape, s)
        if not s.device.startswith("cuda"):
            s.runtime_bytes = cal["runtime_bytes"]
        thr = {"fit": cal["fit"], "train": cal["train"]}
    p = make_plan(shape, s, thr)
    if cal is not None:
        p["calibration"] = cal
    return p


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `msif plan`")
