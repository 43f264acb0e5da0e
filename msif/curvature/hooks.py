"""Hooks that record layer inputs ``a`` and output gradients ``s`` of tracked layers.

No parameter gradient is ever computed: while recording, every parameter is frozen, the input
embeddings' output is made to require grad (so the graph exists), and gradients are taken only with
respect to the tracked layers' outputs with :func:`torch.autograd.grad`.

For a tracked linear layer ``y = W a + b`` at token ``t`` of sequence ``n``, the gradient of the
sequence loss is ``DW_n = Σ_t s_{n,t} [a_{n,t}; 1]ᵀ``.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..data.encoding import Batch
from ..distributed import unsharded
from ..models.adapters import TrackedModule
from ..objectives import curvature_targets, data_targets, head_gradient, last_hidden_state, model_logits, plain_lm_head, summed_loss
from .precondition import Factored


@contextmanager
def frozen_parameters(model: nn.Module):
    """Temporarily set ``requires_grad=False`` on every parameter (restored on exit)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


class Recorder:
    """Capture inputs and outputs of tracked layers during a forward pass.

    Use as a context manager around a forward pass; then call :meth:`output_grads` with a scalar loss
    to get the gradients w.r.t. the tracked outputs. ``inputs[name]`` is ``(B, T, in_dim)`` (a column
    of ones appended when the layer has a bias), detached.

    Streaming use (memory of one module at a time): with ``on_input(tm, a)`` and ``on_grad(tm, s)``
    nothing is kept here; ``on_input`` is called in the module's forward hook, ``on_grad`` as soon as
    the backward of :meth:`backward` has produced the module's output gradient ``s (B, T, out)``.
    """

    def __init__(self, model: nn.Module, tms: list[TrackedModule], record_inputs: bool = True, append_ones: bool = True,
                 on_input=None, on_grad=None):
        self.model = model
        self.tms = tms
        self.record_inputs = record_inputs
        self.append_ones = append_ones
        self.on_input, self.on_grad = on_input, on_grad
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = []
        self._frozen = None
        self._emb_out: torch.Tensor | None = None
        self._bt: tuple[int, int] | None = None  # (B, T) of the batch in flight

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, ·)`` for a layer that sees its tokens flattened to ``(B·T, ·)`` (OPT's MLP)."""
        if x.dim() == 2 and self._bt is not None and x.shape[0] == self._bt[0] * self._bt[1]:
            return x.reshape(*self._bt, x.shape[-1])
        return x

    def _make_hook(self, tm: TrackedModule):
        def hook(mod, args, output):
            if self.record_inputs:
                a = self._tokens(args[0].detach())
                if tm.bias and self.append_ones:
                    a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
                if self.on_input is not None:
                    self.on_input(tm, a)
                else:
                    self.inputs[tm.name] = a
            if self.on_grad is not None:
                if output.requires_grad:
                    output.register_hook(lambda g: self.on_grad(tm, self._tokens(g)))
            else:
                self.outputs[tm.name] = output

        return hook

    def _require_grad_and_keep(self, mod, args, output):
        out = self._require_grad(mod, args, output)
        self._emb_out = out
        self._bt = tuple(out.shape[:2]) if out.dim() == 3 else None
        return out

    def backward(self, output: torch.Tensor, grad: torch.Tensor | None = None) -> None:
        """Activation-only backward in streaming mode, of a scalar loss or of ``output`` with the given
        ``grad``: every tracked module's ``on_grad`` fires once its output gradient exists (no parameter
        gradient; the graph is released)."""
        if self._emb_out is None:
            raise RuntimeError("backward() needs a forward pass inside the recorder")
        torch.autograd.grad(output, [self._emb_out], grad_outputs=grad, allow_unused=True)
        self._emb_out = None

    @staticmethod
    def _require_grad(mod, args, output):
        return output.requires_grad_(True) if not output.requires_grad else output

    def __enter__(self) -> "Recorder":
        self._frozen = frozen_parameters(self.model)
        self._frozen.__enter__()
        emb = self.model.get_input_embeddings()
        self._handles.append(emb.register_forward_hook(self._require_grad_and_keep))
        for tm in self.tms:
            self._handles.append(self.model.get_submodule(tm.name).register_forward_hook(self._make_hook(tm)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._frozen.__exit__(*exc)
        return False

    def output_grads(self, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """``s`` for every tracked layer, ``(B, T, out)``, from a scalar ``loss`` (graph released)."""
        names = list(self.outputs)
        grads = torch.autograd.grad(loss, [self.outputs[n] for n in names], allow_unused=True)
        out = {}
        for n, g in zip(names, grads):
            out[n] = self._tokens(torch.zeros_like(self.outputs[n]) if g is None else g)
        self.outputs.clear()
        return out


# --------------------------------------------------------------------------------------------------
# The gradient pass every stage uses (fitting, query vectors, scoring)


def _check_loss(loss: torch.Tensor, batch: Batch) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(
            "the loss is NaN or infinite on a batch: check the model weights and the inputs (examples "
            f"{batch.indices.tolist()})"
        )


def record_batch(model: nn.Module, tms, batch: Batch, targets_fn, append_ones: bool = True) -> tuple[dict, dict, torch.Tensor]:
    """One forward + activation-only backward with hooks, every module's ``a`` and ``s`` returned at once.

    ``targets_fn(logits) -> targets`` gives the labels of the loss. Returns ``(a, s, logits)`` where
    ``a[module]`` is ``(B, T, in_dim)`` (``(B, T, in_features)`` with ``append_ones=False``) and
    ``s[module]`` is ``(B, T, out)``. With right padding and causal attention, ``s`` is exactly zero at
    padding positions (no loss there, and no real token sees them), so ``Σ_t s_t a_tᵀ`` needs no mask;
    ``a`` is *not* zeroed at padding (the covariance pass selects real tokens itself). Fitting uses
    :func:`stream_batch` instead, which never holds more than one module's ``s``.
    """
    with Recorder(model, tms, append_ones=append_ones) as rec:
        logits = model_logits(model, batch)
        targets = targets_fn(logits)
        loss = summed_loss(logits, targets).sum()
        _check_loss(loss, batch)
        s = rec.output_grads(loss)
        a = rec.inputs
    return a, s, logits.detach()


def stream_batch(model: nn.Module, tms, batch: Batch, objective: str, labels: str, seed: int, stream: int,
                 on_input, on_grad) -> None:
    """One forward + activation-only backward of the summed loss of ``objective`` with the labels of
    :func:`curvature_targets` (``labels="empirical"``: the data's own, as for scoring candidates);
    ``on_input(tm, a)`` runs in each tracked module's forward hook (``a`` without a column of ones),
    ``on_grad(tm, s)`` as soon as the backward has produced that module's output gradient. For
    registered causal LMs the head's gradient is formed in closed form a chunk of tokens at a time
    (:func:`head_gradient`), never materialising the ``(B, T, V)`` logits."""
    head = plain_lm_head(model) if objective != "classification" else None
    with Recorder(model, tms, append_ones=False, on_input=on_input, on_grad=on_grad) as rec:
        if head is not None:
            hidden = last_hidden_state(model, batch)
            with unsharded(getattr(model, "_msif_head_unit", None)):  # FSDP: the head's whole weight
                grad, loss = head_gradient(hidden, head, batch, objective, labels, seed, stream)
            _check_loss(loss, batch)
            rec.backward(hidden, grad)
            return
        logits = model_logits(model, batch)
        loss = summed_loss(logits, curvature_targets(logits, batch, objective, labels, seed, stream)).sum()
        del logits
        _check_loss(loss, batch)
        rec.backward(loss)


def per_example_grads(model: nn.Module, tms, batch: Batch, objective: str, targets=None) -> dict[str, torch.Tensor]:
    """Per-example gradients ``DW_n = Σ_t s_{n,t} a_{n,t}ᵀ``: module name → ``(B, out, in_dim)``.

    ``targets`` defaults to the data labels (the training loss / measurement ``m``).
    """
    return {n: f.dense() for n, f in per_example_factors(model, tms, batch, objective, targets).items()}


def per_example_factors(model: nn.Module, tms, batch: Batch, objective: str, targets=None) -> dict[str, Factored]:
    """The same gradients unformed, ``DW_n = s_nᵀ a_n``: module name → :class:`Factored` with
    ``s (B, T, out)`` and ``a (B, T, in_dim)`` (``T·(out + in_dim)`` numbers per example instead of
    ``out·in_dim``; the preconditioner's first rotation can use the factors directly)."""
    fn = (lambda logits: data_targets(batch, objective)) if targets is None else (lambda logits: targets)
    a, s, _ = record_batch(model, tms, batch, fn)
    return {n: Factored(s[n], a[n]) for n in a}
