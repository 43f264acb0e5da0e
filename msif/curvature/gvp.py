"""Matrix-free GGN-vector products ``V ↦ G V`` for many vectors at once, in the model's own precision.

``G`` is the GGN the factors approximate (:mod:`msif.curvature.fit`): for one stage's objective
(``lm``, ``answer`` or ``classification``, :mod:`msif.objectives`), summed over the counted
predictions of a sequence and averaged over the ``N`` sequences of a sample,

    G = (1/N) Σ_n Σ_t J_tᵀ (diag p_t − p_t p_tᵀ) J_t,

with ``J_t`` the Jacobian of the logits at position ``t`` w.r.t. the tracked weights ``[W | b]``.
Vectors are dicts module → ``(k, out, in_dim)`` (the layout of query gradients and query vectors);
the ``k`` columns share every forward pass.

Per batch and product: one forward whose graph is kept (``vjp``), ``k`` tangents ``J v`` as the
transpose of the pull-back on that same graph (double ``vjp``, vectorised over the columns; no second
forward), the softmax Hessian at the counted positions, and one pull-back ``Jᵀ u`` (vectorised). For causal LMs with a plain linear head
(:func:`msif.objectives.plain_lm_head`) the product stops at the last hidden state and applies
``W_Uᵀ (diag p − p pᵀ) W_U`` a chunk of tokens at a time, so no ``(k, B, T, V)`` tensor is formed;
otherwise (classifiers, other heads) it goes through the model's logits.

Memory per product: the activations of one batch for the ``vjp`` and ``k`` copies of its backward
for the tangents (``k × B × T × d`` per activation), plus ``3 k D`` numbers for the input, the output
and the pull-back. :attr:`GGNOperator.columns` bounds ``k`` per pass (columns beyond it run in
further passes). The product is exact: tested against the dense GGN of
:mod:`msif.curvature.exact` to 1e-10 in float64.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterable, Sequence

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..data.encoding import Batch
from ..models.adapters import TrackedModule
from ..objectives import LOGIT_CHUNK, check_objective, data_targets, plain_lm_head

#: columns of one vectorised product at most (more run in further passes)
COLUMNS = 16


def split_weights(mats: dict[str, torch.Tensor], tms: Sequence[TrackedModule]) -> dict[str, torch.Tensor]:
    """``{module: [W | b] (…, out, in_dim)}`` → ``{"<module>.weight": …, "<module>.bias": …}`` in each
    module's own storage layout (HF ``Conv1D`` stores ``Wᵀ``)."""
    d = {}
    for tm in tms:
        m = mats[tm.name]
        w = m[..., : tm.in_features]
        d[f"{tm.name}.weight"] = w.transpose(-1, -2) if tm.transposed else w
        if tm.bias:
            d[f"{tm.name}.bias"] = m[..., tm.in_features]
    return d


def counted(batch: Batch, objective: str) -> torch.Tensor:
    """The predictions the objective counts: ``(B, T)`` for token objectives, ``(B,)`` for classification."""
    if objective == "classification":
        return torch.ones(batch.size, dtype=torch.bool, device=batch.input_ids.device)
    return data_targets(batch, objective) != -100


def _softmax_hessian(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``(diag p − p pᵀ) u`` along the last axis (``p`` broadcasts over the leading column axis of ``u``)."""
    return p * u - p * (p * u).sum(-1, keepdim=True)


class GGNOperator:
    """``V ↦ G V`` over a fixed sample of ``batches`` of one stage (see the module docstring).

    ``model``: the stage's model (θ_pt or θ_ft) with the tracked modules ``tms``; ``objective``: the
    stage's (what its factors were fitted on). The product is taken at the model's current
    parameters, in its dtype and on its device; the model is left in the mode it was in.
    :attr:`products` counts the columns multiplied so far, :attr:`seconds` their time.
    """

    def __init__(self, model: nn.Module, tms: Sequence[TrackedModule], batches: Iterable[Batch], objective: str,
                 columns: int = COLUMNS):
        self.model, self.tms, self.objective = model, list(tms), check_objective(objective)
        self.batches = [b for b in batches if b.size]
        self.N = sum(b.size for b in self.batches)
        if self.N == 0:
            raise ValueError("the GGN-vector product needs at least one example")
        if columns < 1:
            raise ValueError("columns must be ≥ 1")
        self.columns = columns
        p0 = next(model.parameters())
        self.dtype, self.device = p0.dtype, p0.device
        self.head = None if objective == "classification" else plain_lm_head(model)
        self.W = {tm.name: tm.weight_matrix(model.get_submodule(tm.name)).detach() for tm in self.tms}
        own = set(split_weights(self.W, self.tms))
        self.frozen = {n: p.detach() for n, p in model.named_parameters() if n not in own}
        self.frozen.update(dict(model.named_buffers()))
        cfg = getattr(model, "config", None)
        self.kwargs = {"use_cache": False} if cfg is not None and hasattr(cfg, "use_cache") else {}
        self.products, self.seconds = 0, 0.0
        self._step: float | None = None

    # ------------------------------------------------------------------ the stage's outputs as a function of W
    def _params(self, W: dict) -> dict:
        """Every parameter and buffer of the model, the tracked weights taken from ``W``."""
        params = dict(self.frozen)
        params.update(split_weights(W, self.tms))
        return params

    def _outputs(self, W: dict, batch: Batch) -> torch.Tensor:
        """Last hidden states ``(B, T, d)`` (plain head) or logits ``(B, T, V)`` / ``(B, C)``."""
        params = self._params(W)
        kw = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, **self.kwargs}
        # the math SDPA backend is plain differentiable ops: forward-mode AD and vmapped pull-backs work
        with sdpa_kernel([SDPBackend.MATH]):
            if self.head is not None:
                prefix = self.model.base_model_prefix + "."
                base = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
                out = functional_call(self.model.base_model, base, args=(), kwargs=kw)
                return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            out = functional_call(self.model, params, args=(), kwargs=kw)
        return out.logits if hasattr(out, "logits") else out

    def _hessian(self, z: torch.Tensor, JV: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The loss's Hessian w.r.t. the outputs applied to the tangents ``JV (k, *z.shape)``, zero at
        uncounted positions."""
        keep = mask.unsqueeze(-1).to(JV.dtype)
        if self.head is None:
            return _softmax_hessian(torch.softmax(z, -1), JV) * keep
        Wu, bu = self.head.weight.detach(), None if self.head.bias is None else self.head.bias.detach()
        out = torch.zeros_like(JV)
        h = z[mask]  # (n, d)
        jv = JV[:, mask]  # (k, n, d)
        step = max(1, LOGIT_CHUNK // (Wu.shape[0] * JV.shape[0]))
        for i in range(0, h.shape[0], step):
            p = torch.softmax(nn.functional.linear(h[i : i + step], Wu, bu), -1)  # (c, V)
            u = _softmax_hessian(p, jv[:, i : i + step] @ Wu.T)  # (k, c, V)
            jv[:, i : i + step] = u @ Wu
        out[:, mask] = jv
        return out

    def step_seconds(self) -> float:
        """Seconds of one plain training step over the sample (forward + backward of the summed loss with
        the data labels, gradients of the tracked weights), measured once: the unit of the product's cost."""
        if self._step is None:
            from ..objectives import summed_loss

            with self._eval():
                t0 = time.perf_counter()
                for b in self.batches:
                    b = b.to(self.device)
                    W = {n: w.clone().requires_grad_(True) for n, w in self.W.items()}
                    with torch.enable_grad():
                        logits = functional_call(self.model, self._params(W), args=(), kwargs={"input_ids": b.input_ids,
                                                 "attention_mask": b.attention_mask, **self.kwargs}).logits
                        loss = summed_loss(logits, data_targets(b, self.objective)).sum()
                        torch.autograd.grad(loss, list(W.values()))
                self._step = time.perf_counter() - t0
        return self._step

    @contextlib.contextmanager
    def _eval(self):
        was = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was)

    # ------------------------------------------------------------------ the product
    def __call__(self, V: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``G V`` for ``V``: module → ``(k, out, in_dim)`` (every tracked module); new tensors, same dtype as ``V``."""
        names = [tm.name for tm in self.tms]
        if set(V) != set(names):
            raise ValueError(f"vectors for modules {sorted(V)}, the operator tracks {sorted(names)}")
        k = next(iter(V.values())).shape[0]
        t0 = time.perf_counter()
        out = {n: torch.zeros_like(V[n]) for n in names}
        for c in range(0, k, self.columns):
            X = {n: V[n][c : c + self.columns].to(device=self.device, dtype=self.dtype) for n in names}
            for n, y in self._product(X).items():
                out[n][c : c + self.columns] = y.to(out[n].dtype)
        self.products += k
        self.seconds += time.perf_counter() - t0
        return out

    def _product(self, X: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        acc = {n: torch.zeros_like(x) for n, x in X.items()}
        with self._eval():
            for b in self.batches:
                b = b.to(self.device)
                mask = counted(b, self.objective)
                if not bool(mask.any()):
                    continue
                f = lambda W, b=b: self._outputs(W, b)  # noqa: E731
                z, pull = vjp(f, self.W)
                # J v as the transpose of the (linear) pull-back u ↦ Jᵀu: it runs on the forward graph
                # kept for the pull-back, so jvp and vjp share one forward (benchmarks/refine.py: 1.26
                # training steps per vector for 16 vectors, as with a vmapped forward-mode jvp)
                _, tangents = vjp(lambda u: pull(u)[0], torch.zeros_like(z))
                z = z.detach()
                JV = vmap(lambda x: tangents(x)[0])(X)
                U = self._hessian(z, JV.detach(), mask)
                del JV
                for n, g in vmap(lambda u: pull(u)[0])(U).items():
                    acc[n] += g.detach()
                del U, pull, z
        return {n: a / self.N for n, a in acc.items()}
