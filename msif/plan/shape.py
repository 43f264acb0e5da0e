"""The sizes of a model the plan needs, read from its config and its tracked layers (meta device)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..data.encoding import InputError
from .settings import PlanSettings, dtype_name


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
    from ..models.adapters import tracked_modules

    s = settings or PlanSettings(model="")
    tms = tracked_modules(model, per_head=s.per_head, modules=s.modules, generic=s.generic)
    cfg = model.config
    g = lambda *names: next((getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None), None)  # noqa: E731
    hidden = g("hidden_size", "n_embd", "d_model") or 0
    # transformers ≥ 4.56 names it ``dtype`` (``torch_dtype`` is a deprecated alias that warns on access)
    cfg_dtype = vars(cfg).get("dtype") if "dtype" in vars(cfg) else getattr(cfg, "torch_dtype", None)
    dtype = dtype_name(cfg_dtype) if s.dtype == "auto" and cfg_dtype is not None else (
        "float32" if s.dtype == "auto" else dtype_name(s.dtype))
    if model.device.type != "meta":
        dtype = dtype_name(next(model.parameters()).dtype) if s.dtype == "auto" else dtype
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
