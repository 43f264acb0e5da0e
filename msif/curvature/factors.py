"""Curvature factors: statistics kept as sums with counts, and the damped inverse (stored on disk by
:mod:`msif.curvature.factor_io`).

For a block (rows ``r`` of a tracked module's ``(out, in_dim)`` matrix) the GGN block ``G_W`` of the
dataset loss ``L = (1/N) Σ_n ℓ(z_n)`` is approximated as follows (docs/method.md §2):

* ``A = A_sum / n_tokens`` (token mean of ``a aᵀ``, shared by the module's blocks),
  ``S = S_sum / n_tokens`` (token mean of ``s sᵀ`` over the block's rows);
* with ``refine = k > 0`` (EK-FAC), ``k`` alternating-least-squares passes then move ``A`` and ``S``
  towards the nearest Kronecker product of each block (``msif.curvature.fit._refine_pass``); the
  stored "sums" are then the refined factors times ``n_tokens`` and cannot be merged;
* ``A = Q_A diag(eig_A) Q_Aᵀ``, ``S = Q_S diag(eig_S) Q_Sᵀ`` (float64 ``eigh``);
* EK-FAC: ``Λ = lambda_sum / n_examples``, the mean over sequences of ``(Q_Sᵀ DW_n Q_A)²``;
* K-FAC: ``Λ = (n_tokens / n_examples) · eig_S eig_Aᵀ`` (rescaled to the same GGN scale);
* diagonal: ``Λ = diag_sum / n_examples`` (mean of ``DW_n²``) in the identity basis;
* identity: no curvature; preconditioning returns the vector unchanged (gradient dot product).

The damped inverse-HVP of ``V`` (shaped like the block) is
``Q_S [(Q_Sᵀ V Q_A) ⊘ (Λ + λ)] Q_Aᵀ``. Damping is applied on the fly: loaded factors are never
modified.
"""

from __future__ import annotations

import copy
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..models.adapters import Block, TrackedModule
from .damping import Damping
from .factor_io import FORMAT_VERSION, META_FILE, TENSOR_FILE, FactorError, read_factors, write_factors
from .factor_io import sha256_file as _sha256  # looked up by save at call time (a test interrupts a save through it)

__all__ = ["STRATEGIES", "FORMAT_VERSION", "TENSOR_FILE", "META_FILE", "FactorError", "Damping", "BlockStats",
           "FactorSet", "symmetric_eigh"]


STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")

@dataclass
class BlockStats:
    """Sums and counts for one block (mergeable by addition)."""

    S_sum: torch.Tensor | None = None  # (out_b, out_b)
    lambda_sum: torch.Tensor | None = None  # (out_b, in_dim): EK-FAC or diagonal sums


@dataclass
class FactorSet:
    """Fitted factors for a model: sums and counts, plus the eigendecompositions derived from them.

    ``modules`` maps module name → its :class:`TrackedModule`; ``A_sum`` module name → ``(in_dim, in_dim)``;
    ``blocks`` block name → :class:`Block`; ``stats`` block name → :class:`BlockStats`.
    Eigenvectors/values are filled by :meth:`eigendecompose`.
    """

    strategy: str
    modules: dict[str, TrackedModule]
    blocks: dict[str, Block]
    A_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, BlockStats] = field(default_factory=dict)
    n_tokens: int = 0  # tokens seen by the covariance pass
    n_examples_cov: int = 0  # sequences seen by the covariance pass
    n_examples_lambda: int = 0  # sequences seen by the eigenvalue-correction / diagonal pass
    meta: dict = field(default_factory=dict)
    QA: dict[str, torch.Tensor] = field(default_factory=dict)
    eigA: dict[str, torch.Tensor] = field(default_factory=dict)
    QS: dict[str, torch.Tensor] = field(default_factory=dict)
    eigS: dict[str, torch.Tensor] = field(default_factory=dict)

    # ------------------------------------------------------------------------------ storage
    @property
    def dtype(self) -> torch.dtype:
        """The dtype the factors are held in (eigenvectors and Λ sums; float32 unless fitted in float64)."""
        for d in (self.QA, self.A_sum):
            for x in d.values():
                return x.dtype
        for st in self.stats.values():
            if st.lambda_sum is not None:
                return st.lambda_sum.dtype
        return torch.float64

    @property
    def device(self) -> torch.device:
        for x in self._tensors(cpu=False).values():
            return x.device
        return torch.device("cpu")

    def nbytes(self) -> int:
        """Bytes of every tensor held (sums, eigenvectors, eigenvalues, Λ sums)."""
        return sum(x.numel() * x.element_size() for x in self._tensors(cpu=False).values())

    def drop_sums(self) -> "FactorSet":
        """Free the covariance sums (``A_sum``, ``S_sum``): scoring needs only eigenvectors and Λ.
        The factors can then no longer be merged, refined or saved."""
        if self.strategy in ("ekfac", "kfac") and not self.QA:
            raise FactorError("eigendecompose the factors before dropping their covariance sums")
        self.A_sum = {}
        for st in self.stats.values():
            st.S_sum = None
        self.meta["sums_dropped"] = True
        return self

    # ----------------------------------------------------------------------------------- math
    def eigendecompose(self, dtype: torch.dtype | None = None, keys=None) -> None:
        """Eigendecompose ``A`` and ``S`` in float64 on the sums' device (needs the covariance pass);
        the eigenvectors and eigenvalues are kept in ``dtype`` (default: the sums' dtype). ``keys``:
        only these of :meth:`eigen_inputs` (a rank's share in a distributed fit)."""
        if self.n_tokens <= 0:
            raise FactorError("no tokens were seen by the covariance pass; cannot eigendecompose")

        mats = self.eigen_inputs()
        if keys is not None:
            mats = {k: mats[k] for k in keys}
        for key, (ev, Q) in symmetric_eigh(mats, 1.0 / self.n_tokens).items():
            dt = dtype or mats[key].dtype
            self.set_eigen(key, ev.clamp_min(0.0).to(dt).contiguous(), Q.to(dt).contiguous())

    def eigen_inputs(self) -> dict[tuple[str, str], torch.Tensor]:
        """The covariance sums to eigendecompose: ``("A", module)`` and ``("S", block)`` → sum."""
        mats = {("A", m): A for m, A in self.A_sum.items()}
        mats.update({("S", b): st.S_sum for b, st in self.stats.items() if st.S_sum is not None})
        return mats

    def _eigen_dicts(self, kind: str) -> tuple[dict, dict]:
        return (self.eigA, self.QA) if kind == "A" else (self.eigS, self.QS)

    def set_eigen(self, key: tuple[str, str], ev: torch.Tensor, Q: torch.Tensor) -> None:
        """Store ``(eigenvalues, eigenvectors)`` of a key of :meth:`eigen_inputs`."""
        self.__dict__.pop("_summaries", None)
        evs, Qs = self._eigen_dicts(key[0])
        evs[key[1]], Qs[key[1]] = ev, Q

    def eigen(self, key: tuple[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(eigenvalues, eigenvectors)`` of a key of :meth:`eigen_inputs`."""
        evs, Qs = self._eigen_dicts(key[0])
        return evs[key[1]], Qs[key[1]]

    def lambdas(self, block: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The diagonal ``Λ`` ``(out_b, in_dim)`` of the block in its eigenbasis (a new tensor in ``dtype``)."""
        b = self.blocks[block]
        if self.strategy == "ekfac" or self.strategy == "diagonal":
            if self.n_examples_lambda <= 0:
                raise FactorError("no examples were seen by the eigenvalue-correction pass")
            return self.stats[block].lambda_sum.to(dtype) / self.n_examples_lambda
        if self.strategy == "kfac":
            scale = self.n_tokens / self.n_examples_cov
            return scale * torch.outer(self.eigS[block].to(dtype), self.eigA[b.module].to(dtype))
        raise FactorError(f"strategy {self.strategy!r} has no eigenvalues")

    def with_lambdas(self, lambdas: dict[str, torch.Tensor]) -> "FactorSet":
        """A copy whose ``Λ`` is ``lambdas[block]`` ``(out_b, in_dim)`` for the blocks given (same
        eigenbases; EK-FAC or diagonal factors): e.g. the exact ``Λ`` in the fitted eigenbasis. Kept
        as float64 sums, so :meth:`precondition` and :func:`~msif.curvature.precondition.chain` apply
        it like fitted factors. This set is not modified."""
        if self.strategy not in ("ekfac", "diagonal"):
            raise FactorError(f"only EK-FAC and diagonal factors hold their own Λ, not {self.strategy!r}")
        new = copy.copy(self)
        new.__dict__.pop("_summaries", None)
        new.stats = {b: copy.copy(st) for b, st in self.stats.items()}
        for b, x in lambdas.items():
            new.stats[b].lambda_sum = x.double() * self.n_examples_lambda
        return new

    def _summary(self, name: str, fn) -> float:
        """``fn()`` cached until a tensor or count it reads changes (checked by identity and version)."""
        state = (self.strategy, self.n_examples_lambda, self.n_tokens, self.n_examples_cov,
                 tuple((id(x), x._version) for x in self._eigenvalue_tensors()))
        cache = self.__dict__.setdefault("_summaries", {})
        if cache.get(name, (None,))[0] != state:
            cache[name] = (state, fn())
        return cache[name][1]

    def _eigenvalue_tensors(self) -> list[torch.Tensor]:
        if self.strategy == "kfac":
            return list(self.eigS.values()) + list(self.eigA.values())
        return [st.lambda_sum for st in self.stats.values() if st.lambda_sum is not None]

    def mean_eigenvalue(self) -> float:
        """Mean of ``Λ`` over every entry of every block: ``trace(G) / D`` of the approximation."""
        if self.strategy == "identity":
            return 1.0

        def mean():
            total, count = 0.0, 0
            for b in self.blocks:
                lam = self.lambdas(b)
                total += float(lam.sum())
                count += lam.numel()
            return total / max(count, 1)

        return self._summary("mean", mean)

    def _largest_eigenvalue(self) -> float:
        if self.strategy == "identity":
            return 1.0
        return self._summary("largest", lambda: max((float(self.lambdas(b).max()) for b in self.blocks), default=0.0))

    def resolve_damping(self, damping) -> float:
        d = Damping.parse(damping)
        return d.value * self.mean_eigenvalue() if d.relative else d.value

    def inverse_eigenvalues(self, block: str, lam: float, dtype: torch.dtype) -> torch.Tensor:
        """``1 / (Λ + λ)`` of a block in ``dtype`` for an absolute damping ``lam`` (a new tensor: the
        queries of a stage share it). Undamped, eigenvalues below eps × the largest of all blocks count
        as zero and are refused: rounding in the model's backward leaves 1e-40 where the exact
        eigenvalue is 0 (the Q/K gradients of one token)."""
        lam_b = self.lambdas(block, dtype)
        if lam == 0 and bool((lam_b <= self._largest_eigenvalue() * torch.finfo(dtype).eps).any()):
            raise FactorError(
                f"block {block} has zero eigenvalues (to the factors' precision) and damping is 0: the "
                "inverse does not exist; use a positive damping"
            )
        return lam_b.add_(lam).reciprocal_()

    def precondition(self, grads: dict, damping, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Damped inverse-GGN times ``grads`` per block (one stage of
        :func:`msif.curvature.precondition.chain`).

        ``grads`` maps module name → ``(..., out, in_dim)`` (leading dims = several vectors) or
        :class:`~msif.curvature.precondition.Factored`. Returns new tensors in ``dtype`` (default: the
        factors' own dtype, float32 for a default fit) on the factors' device. Modules without
        factors raise. Nothing stored here is modified.
        """
        from .precondition import chain

        return chain([(self, damping)], grads, dtype)

    def dense_block(self, block: str, damping=0.0) -> torch.Tensor:
        """The dense ``(out_b·in_dim)²`` matrix ``G_block + λI`` this approximation stands for (tests only).

        Row-major vectorisation of the ``(out_b, in_dim)`` block: ``vec(V)[i*in_dim + j] = V[i, j]``.
        """
        lam = self.resolve_damping(damping)
        b = self.blocks[block]
        n = b.out_dim * self.modules[b.module].in_dim
        if self.strategy == "identity":
            return torch.eye(n, dtype=torch.float64)
        if self.strategy == "diagonal":
            return torch.diag(self.lambdas(block).reshape(-1) + lam)
        K = torch.kron(self.QS[block].double(), self.QA[b.module].double())  # row-major: (Q_S ⊗ Q_A) vec(R) = vec(Q_S R Q_Aᵀ)
        return K @ torch.diag(self.lambdas(block).reshape(-1) + lam) @ K.T

    # -------------------------------------------------------------------------------- merging
    def merge_(self, other: "FactorSet") -> "FactorSet":
        """Add another partial run's sums and counts into this one (same model and settings)."""
        self.__dict__.pop("_summaries", None)
        if set(self.blocks) != set(other.blocks) or self.strategy != other.strategy:
            raise FactorError("cannot merge factors of different blocks or strategies")
        if any(f.meta.get("sums_dropped") for f in (self, other)):
            raise FactorError("factors loaded for scoring only (without their covariance sums) cannot be merged")
        if any((f.meta.get("config") or {}).get("refine", 0) for f in (self, other)):
            raise FactorError(
                "factors fitted with refine > 0 cannot be merged: the refined A and S are not sums over "
                "examples. Merge the partial runs without refinement, or refit on all the data."
            )
        for m, A in other.A_sum.items():
            self.A_sum[m] = self.A_sum[m] + A if m in self.A_sum else A.clone()
        for b, st in other.stats.items():
            mine = self.stats.setdefault(b, BlockStats())
            for f in ("S_sum", "lambda_sum"):
                x = getattr(st, f)
                if x is not None:
                    y = getattr(mine, f)
                    setattr(mine, f, x.clone() if y is None else y + x)
        self.n_tokens += other.n_tokens
        self.n_examples_cov += other.n_examples_cov
        self.n_examples_lambda += other.n_examples_lambda
        return self

    # ----------------------------------------------------------------------------- persistence
    def _tensors(self, cpu: bool = True) -> dict[str, torch.Tensor]:
        """Every tensor by its key in the file (``kind/name``); moved to the CPU for writing unless ``cpu=False``."""
        t = {}
        for m, A in self.A_sum.items():
            t[f"A_sum/{m}"] = A
        for k, d in (("QA", self.QA), ("eigA", self.eigA), ("QS", self.QS), ("eigS", self.eigS)):
            for n, x in d.items():
                t[f"{k}/{n}"] = x
        for b, st in self.stats.items():
            if st.S_sum is not None:
                t[f"S_sum/{b}"] = st.S_sum
            if st.lambda_sum is not None:
                t[f"lambda_sum/{b}"] = st.lambda_sum
        if not cpu:
            return t
        return {k: v.detach().cpu().contiguous() for k, v in t.items()}

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``factors.safetensors`` + ``factors.json`` atomically into ``out_dir``
        (:func:`msif.curvature.factor_io.write_factors`).

        The directory is written under a temporary name next to it and renamed into place, so a
        killed run leaves either the previous factors or the new ones, never a mix.
        """
        return write_factors(self, out_dir, checksum=_sha256)

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True, for_scoring: bool = False,
             device: str | torch.device | None = None) -> "FactorSet":
        """Load factors written by :meth:`save`; a missing, truncated or corrupt file raises FactorError.

        ``for_scoring``: read only what preconditioning needs (eigenvectors, eigenvalues, Λ sums), not
        the covariance sums (about half of an EK-FAC file); such factors cannot be merged or saved.
        ``device``: where the tensors go (default: the CPU). ``verify``: check the tensors' sha256.
        """
        return read_factors(cls, path, verify, for_scoring, device)

    def set_tensor(self, key: str, x: torch.Tensor) -> None:
        """Put one tensor back by its key of :meth:`_tensors` (``kind/name``)."""
        self.__dict__.pop("_summaries", None)
        kind, name = key.split("/", 1)
        if kind == "A_sum":
            self.A_sum[name] = x
        elif kind in ("QA", "eigA", "QS", "eigS"):
            getattr(self, kind)[name] = x
        else:
            setattr(self.stats.setdefault(name, BlockStats()), kind, x)

    # ------------------------------------------------------------------------------ checks
    def check_model(self, fingerprint: str, what: str = "model") -> None:
        """Raise if these factors were fitted on a model with another fingerprint."""
        fp = self.meta.get("fingerprint")
        if fp is not None and fp != fingerprint:
            raise FactorError(
                f"these factors were fitted on model {self.meta.get('model_name', '?')} (fingerprint {fp[:12]}…), "
                f"not on the {what} they are applied to (fingerprint {fingerprint[:12]}…). Fit factors for this "
                "model with `msif fit`, or pass the model they were fitted on."
            )


def symmetric_eigh(mats: dict, scale: float = 1.0) -> dict:
    """``{key: (eigenvalues, eigenvectors)}`` of ``scale · M`` for every symmetric ``M`` in ``mats``, in
    float64 on each matrix's device, equal-sized matrices of a device in one batched call.

    On the CPU this goes through numpy's LAPACK (``syevd``): with torch's passive OpenMP waiting (see
    :mod:`msif`) ``torch.linalg.eigh`` of a 1024×1024 matrix took 0.22 s here against numpy's 0.12 s, and
    the fit's hundreds of per-head 32×32 blocks cost a thread wake-up each.
    """
    groups: dict[tuple, list] = {}
    for key, M in mats.items():
        d = M.shape[-1]
        per_stack = max(1, _EIGH_STACK_BYTES // (8 * d * d))  # a 7B model's 11008² factors go one at a time
        keys = groups.setdefault((M.device, d), [[]])
        if len(keys[-1]) == per_stack:
            keys.append([])
        keys[-1].append(key)
    out = {}

    def run(device, keys):
        X = torch.stack([mats[k].to(torch.float64) for k in keys]) * scale
        if device.type == "cpu":
            ev, Q = (torch.from_numpy(x) for x in np.linalg.eigh(X.numpy()))
        else:
            ev, Q = torch.linalg.eigh(X)
        del X
        one = len(keys) == 1
        for i, k in enumerate(keys):  # clones: no factor keeps a whole stack alive
            out[k] = (ev[i], Q[i]) if one else (ev[i].clone(), Q[i].clone())

    work = sorted(((dev, keys) for (dev, d), stacks in groups.items() for keys in stacks),
                  key=lambda w: -mats[w[1][0]].shape[-1])  # largest first: the pool ends evenly
    cpu = [w for w in work if w[0].type == "cpu"]
    workers = min(torch.get_num_threads(), len(cpu))
    if workers > 1:
        # LAPACK's eigh scales poorly across threads: one single-threaded eigh per core instead
        # (measured here: 0.095 s per 1024² matrix on 2 cores against 0.125 s two-threaded); numpy
        # releases the GIL inside LAPACK
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda w: run(*w), cpu))
        work = [w for w in work if w[0].type != "cpu"]
    for w in work:
        run(*w)
    return out


# equal-sized matrices are eigendecomposed in stacks of at most this many bytes (float64)
_EIGH_STACK_BYTES = 1 << 27

