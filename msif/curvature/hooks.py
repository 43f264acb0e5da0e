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

from ..models.adapters import TrackedModule


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
