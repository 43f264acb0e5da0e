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

The pieces: :mod:`.settings` (what is planned), :mod:`.shape` (the model, from its config),
:mod:`.memory` and :mod:`.flops` (per stage), :mod:`.stages` (the plan and its recommendation),
:mod:`.calibrate`, :mod:`.report` (the table) and :mod:`.command` (`msif plan`).
"""

from .calibrate import calibrate, corpus_stats
from .command import run
from .constants import (ACT_PER_TOKEN_D, ACT_PER_TOKEN_F, ATTRIBUTE_CHUNK, CHUNK_ELEMS, CPU_RUNTIME_BYTES, DTYPE_BYTES,
                        EMBED_DIM, EMBED_MAX_TOKENS, EMBEDDER_PARAMS, LOGIT_CHUNK, LOGIT_COPIES, NOMINAL_FLOPS,
                        PAD_MULTIPLE, PLAIN_HEAD_TYPES)
from .flops import fit_flops, forward_flops, query_flops, scoring_flops, train_flops
from .memory import eig_memory, factor_bytes, factor_counts, fit_memory, index_memory, query_memory, scoring_memory
from .report import format_plan
from .settings import PlanSettings
from .shape import ModelShape, ModuleShape, load_shape, model_shape
from .stages import Stage, default_device_memory, make_plan, recommend, seq_len

__all__ = [
    "ACT_PER_TOKEN_D", "ACT_PER_TOKEN_F", "ATTRIBUTE_CHUNK", "CHUNK_ELEMS", "CPU_RUNTIME_BYTES", "DTYPE_BYTES",
    "EMBED_DIM", "EMBED_MAX_TOKENS", "EMBEDDER_PARAMS", "LOGIT_CHUNK", "LOGIT_COPIES", "NOMINAL_FLOPS", "PAD_MULTIPLE",
    "PLAIN_HEAD_TYPES", "ModelShape", "ModuleShape", "PlanSettings", "Stage", "calibrate", "corpus_stats",
    "default_device_memory", "eig_memory", "factor_bytes", "factor_counts", "fit_flops", "fit_memory", "format_plan",
    "forward_flops", "index_memory", "load_shape", "make_plan", "model_shape", "query_flops", "query_memory",
    "recommend", "run", "scoring_flops", "scoring_memory", "seq_len", "train_flops",
]  # fmt: skip
