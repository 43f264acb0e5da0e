"""Architecture adapters: which linear layers msif tracks, their role, and their per-head blocks.

An adapter turns a Hugging Face model into a list of :class:`TrackedModule`. Each tracked module is a
linear map ``y = W a (+ b)`` of the backbone (MLP or attention). Its weight, seen as ``W`` of shape
``(out_features, in_features)`` (HF ``Conv1D`` stores the transpose; ``transposed`` says so), is split
by output rows into :class:`Block` s. A block is one diagonal block of the block-diagonal curvature:
all blocks of a module share the input factor ``A``; each has its own output factor ``S``.

With ``per_head=True`` (the paper's choice, the default) the query, key and value projections of every
head are separate blocks. The row layout of a fused QKV projection is architecture specific:

* GPT-NeoX (Pythia, Dolly) and BLOOM: interleaved per head, ``[h0: q k v | h1: q k v | ...]``;
* GPT-2 (``c_attn``, a ``Conv1D``): ``[Q all heads | K all heads | V all heads]``;
* Llama / Mistral / Qwen2 / OPT: separate ``q_proj``, ``k_proj``, ``v_proj`` (K/V may have fewer heads,
  grouped-query attention).

Embeddings, the unembedding (LM head), classification heads and norms are never tracked.

To support another architecture, write a function ``fn(model, per_head) -> list[TrackedModule]`` and
register it with :func:`register_adapter` under the model's ``config.model_type``.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import MsifError

ROLES = ("mlp", "attention")


@dataclass(frozen=True)
class Block:
    """One curvature block: output rows ``[row_start, row_stop)`` of a tracked module's weight."""

    name: str
    module: str
    role: str
    row_start: int
    row_stop: int
    head: int | None = None
    proj: str | None = None  # "q" | "k" | "v" for per-head attention blocks

    @property
    def rows(self) -> slice:
        return slice(self.row_start, self.row_stop)

    @property
    def out_dim(self) -> int:
        return self.row_stop - self.row_start


@dataclass(frozen=True)
class TrackedModule:
    """A tracked linear layer: ``W`` is ``(out_features, in_features)``; a bias adds one input column."""

    name: str
    role: str
    in_features: int
    out_features: int
    bias: bool
    transposed: bool  # True for HF Conv1D (weight stored as (in, out))
    blocks: tuple[Block, ...] = field(default_factory=tuple)

    @property
    def in_dim(self) -> int:
        """Input dimension of the Kronecker factor A (``in_features + 1`` with a bias)."""
        return self.in_features + int(self.bias)

    def weight_matrix(self, module: nn.Module) -> torch.Tensor:
        """The effective ``(out, in_dim)`` matrix ``[W | b]`` of this layer (a new tensor)."""
        w = module.weight.T if self.transposed else module.weight
        if self.bias:
            return torch.cat([w, module.bias[:, None]], dim=1)
        return w.clone()


AdapterFn = Callable[[nn.Module, bool], list[TrackedModule]]
_ADAPTERS: dict[str, AdapterFn] = {}


def register_adapter(model_type: str, fn: AdapterFn | None = None):
    """Register ``fn(model, per_head) -> list[TrackedModule]`` for ``config.model_type``.

    Usable as a decorator: ``@register_adapter("my_arch")``.
    """

    def deco(f: AdapterFn) -> AdapterFn:
        _ADAPTERS[model_type] = f
        return f

    return deco(fn) if fn is not None else deco


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def _linear_info(model: nn.Module, name: str) -> tuple[int, int, bool, bool]:
    mod = model.get_submodule(name)
    if isinstance(mod, nn.Linear):
        return mod.in_features, mod.out_features, mod.bias is not None, False
    if type(mod).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: y = x @ W + b, W (in, out)
        w = mod.weight
        return w.shape[0], w.shape[1], getattr(mod, "bias", None) is not None, True
    raise TypeError(f"module {name!r} is a {type(mod).__name__}, not a linear layer msif can track")


def _whole(model: nn.Module, name: str, role: str) -> TrackedModule:
    i, o, b, t = _linear_info(model, name)
    return TrackedModule(name, role, i, o, b, t, (Block(name, name, role, 0, o),))


def _heads(model: nn.Module, name: str, segments: list[tuple[str, int, int, int]], per_head: bool) -> TrackedModule:
    """A projection whose output rows are split into per-head blocks.

    ``segments`` lists ``(proj, head, row_start, row_stop)``; with ``per_head=False`` one block.
    """
    i, o, b, t = _linear_info(model, name)
    covered = sorted((s, e) for _, _, s, e in segments)
    pos = 0
    for s, e in covered:
        if s != pos:
            raise ValueError(f"head layout of {name} does not tile its {o} output rows")
        pos = e
    if pos != o:
        raise ValueError(f"head layout of {name} covers {pos} of {o} output rows")
    if not per_head:
        return TrackedModule(name, "attention", i, o, b, t, (Block(name, name, "attention", 0, o),))
    blocks = tuple(
        Block(f"{name}:h{h}.{p}", name, "attention", s, e, head=h, proj=p)
        for p, h, s, e in sorted(segments, key=lambda x: x[2])
    )
    return TrackedModule(name, "attention", i, o, b, t, blocks)


def _layers(model: nn.Module, prefix_re: str) -> list[str]:
    """Names of the transformer layers ``<prefix>.<i>`` in order."""
    pat = re.compile(rf"^(?:[a-zA-Z_]+\.)?{prefix_re}\.(\d+)$")
    found = []
    for n, _ in model.named_modules():
        m = pat.match(n)
        if m:
            found.append((int(m.group(1)), n))
    return [n for _, n in sorted(found)]


def _interleaved_qkv(model: nn.Module, per_head: bool, layers: str, attn: str, n_heads: int) -> list[TrackedModule]:
    """GPT-NeoX / BLOOM: a fused ``query_key_value`` whose rows are interleaved per head.

    GPT-NeoX views the output as ``(B, T, nh, 3*hd)`` and chunks it in 3, BLOOM as ``(B, T, nh, 3, hd)``:
    either way head ``h`` owns rows ``[3*hd*h, 3*hd*(h+1))`` as ``q | k | v``.
    """
    hd = model.config.hidden_size // n_heads
    out = []
    for layer in _layers(model, layers):
        segs = [(p, h, 3 * hd * h + j * hd, 3 * hd * h + (j + 1) * hd) for h in range(n_heads) for j, p in enumerate("qkv")]
        out.append(_heads(model, f"{layer}.{attn}.query_key_value", segs, per_head))
        out.append(_whole(model, f"{layer}.{attn}.dense", "attention"))
        out.append(_whole(model, f"{layer}.mlp.dense_h_to_4h", "mlp"))
        out.append(_whole(model, f"{layer}.mlp.dense_4h_to_h", "mlp"))
    return out


@register_adapter("gpt_neox")
def _gpt_neox(model: nn.Module, per_head: bool) -> list[TrackedModule]:
    return _interleaved_qkv(model, per_head, r"layers", "attention", model.config.num_attention_heads)


@register_adapter("bloom")
def _bloom(model: nn.Module, per_head: bool) -> list[TrackedModule]:
    return _interleaved_qkv(model, per_head, r"h", "self_attention", model.config.n_head)


@register_adapter("gpt2")
def _gpt2(model: nn.Module, per_head: bool) -> list[TrackedModule]:
    cfg = model.config
    nh = cfg.n_head
    d = cfg.n_embd
    hd = d // nh
    out = []
    for layer in _layers(model, r"h"):
        qkv = f"{layer}.attn.c_attn"
        # split(d, dim=2) into Q | K | V, each then viewed as (nh, hd)
        segs = [(p, h, j * d + h * hd, j * d + (h + 1) * hd) for j, p in enumerate("qkv") for h in range(nh)]
        out.append(_heads(model, qkv, segs, per_head))
        out.append(_whole(model, f"{layer}.attn.c_proj", "attention"))
        out.append(_whole(model, f"{layer}.mlp.c_fc", "mlp"))
        out.append(_whole(model, f"{layer}.mlp.c_proj", "mlp"))
    return out


def _separate_qkv(model, layer_prefix: str, attn: str, o_name: str, mlp: list[str], per_head: bool) -> list[TrackedModule]:
    cfg = model.config
    nh = cfg.num_attention_heads
    nkv = getattr(cfg, "num_key_value_heads", None) or nh
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    out = []
    for layer in _layers(model, layer_prefix):
        for p, n in (("q", nh), ("k", nkv), ("v", nkv)):
            name = f"{layer}.{attn}.{p}_proj"
            out.append(_heads(model, name, [(p, h, h * hd, (h + 1) * hd) for h in range(n)], per_head))
        out.append(_whole(model, f"{layer}.{attn}.{o_name}", "attention"))
        for m in mlp:
            out.append(_whole(model, f"{layer}.{m}", "mlp"))
    return out


def _llama_like(model: nn.Module, per_head: bool) -> list[TrackedModule]:
    return _separate_qkv(model, r"layers", "self_attn", "o_proj", ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"], per_head)


for _t in ("llama", "mistral", "qwen2", "qwen3"):
    register_adapter(_t, _llama_like)


@register_adapter("opt")
def _opt(model: nn.Module, per_head: bool) -> list[TrackedModule]:
    return _separate_qkv(model, r"decoder\.layers", "self_attn", "out_proj", ["fc1", "fc2"], per_head)


_EXCLUDE = re.compile(
    r"(^|\.)(lm_head|score|classifier|classification_head|embed_out|wte|wpe|embed_tokens|embed_in|word_embeddings)(\.|$)"
)


def _generic(model: nn.Module, per_head: bool) -> list[TrackedModule]:
    # Only the backbone (``model.base_model`` for HF models): heads such as ``lm_head.dense`` /
    # ``lm_head.decoder`` or ``classifier.out_proj`` live outside it. Embedding modules (and anything
    # inside them) are skipped by identity as well as by name.
    base = getattr(model, "base_model", model)
    prefix = ""
    if base is not model:
        prefix = next((n for n, m in model.named_modules() if m is base), "")
        prefix = prefix + "." if prefix else ""
    skip: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            emb = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            emb = None
        if isinstance(emb, nn.Module):
            skip.update(id(m) for m in emb.modules())
    out = []
    for n, m in model.named_modules():
        if not n or (prefix and not n.startswith(prefix)) or id(m) in skip or _EXCLUDE.search(n):
            continue
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D":
            role = "attention" if re.search(r"attn|attention|q_proj|k_proj|v_proj|o_proj", n) else "mlp"
            out.append(_whole(model, n, role))
    return out


class UnsupportedArchitectureError(MsifError, ValueError):
    pass


def tracked_modules(
    model: nn.Module, per_head: bool = True, modules: str = "all", generic: bool = False
) -> list[TrackedModule]:
    """The tracked linear layers of ``model`` (any HF causal-LM or sequence-classification model).

    ``modules`` selects ``"all"``, ``"mlp"`` or ``"attention"``. ``generic=True`` tracks every backbone
    linear layer of an unregistered architecture, one block per layer, with a warning.
    """
    if modules not in ("all", *ROLES):
        raise ValueError(f"modules must be 'all', 'mlp' or 'attention', not {modules!r}")
    mt = getattr(getattr(model, "config", None), "model_type", None)
    fn = _ADAPTERS.get(mt)
    if fn is None:
        if not generic:
            raise UnsupportedArchitectureError(
                f"msif has no adapter for model_type {mt!r} (supported: {', '.join(supported_model_types())}). "
                "Register one with msif.models.adapters.register_adapter(model_type, fn), or pass "
                "generic=True (CLI: --generic) to track every backbone nn.Linear as one block each."
            )
        warnings.warn(
            f"model_type {mt!r} has no adapter: tracking every backbone linear layer as one block each "
            "(no per-head attention blocks; roles guessed from module names)",
            stacklevel=2,
        )
        fn = _generic
    tms = fn(model, per_head)
    if not tms:
        raise UnsupportedArchitectureError(f"the {mt!r} adapter found no layers to track in {type(model).__name__}")
    if modules != "all":
        tms = [t for t in tms if t.role == modules]
    return tms
