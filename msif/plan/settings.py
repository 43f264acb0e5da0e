"""What `msif plan` plans for: :class:`PlanSettings`, validated as the CLI's options."""

from __future__ import annotations

from dataclasses import dataclass

from ..data.encoding import InputError
from .constants import DTYPE_BYTES


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
        from ..curvature.factors import STRATEGIES

        if self.strategy not in STRATEGIES:
            raise InputError(f"--strategy must be one of {', '.join(STRATEGIES)}, not {self.strategy!r}")
        for name in ("stats_dtype", "factor_dtype"):
            v = getattr(self, name)
            if v is not None and v not in ("float32", "float64"):
                raise InputError(f"--{name.replace('_', '-')} must be float32 or float64, not {v!r}")
        if self.dtype != "auto" and dtype_name(self.dtype) not in DTYPE_BYTES:
            raise InputError(f"--dtype must be auto, float32, float64, bfloat16 or float16, not {self.dtype!r}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise InputError(f"--device must be cpu or cuda, not {self.device!r}")
        return self


def dtype_name(x) -> str:
    s = str(x).removeprefix("torch.")
    return {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32", "double": "float64"}.get(s, s)
