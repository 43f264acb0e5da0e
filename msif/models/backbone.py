"""Matching backbones: the tracked modules a pre-trained and a fine-tuned model (e.g. a causal LM and a
classifier built from it) share, or :class:`BackboneMismatchError` naming the first difference."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from msif.models.adapters import TrackedModule
from ..errors import MsifError


class BackboneMismatchError(MsifError, ValueError):
    """Two models do not share the tracked backbone that multi-stage influence needs."""


def _actual_shape(model: nn.Module, tm: TrackedModule, which: str) -> tuple[int, int]:
    try:
        mod = model.get_submodule(tm.name)
    except AttributeError as e:
        raise BackboneMismatchError(f"model {which} has no module {tm.name!r} (stale tracked-module list?)") from e
    w = mod.weight
    return (w.shape[1], w.shape[0]) if tm.transposed else (w.shape[0], w.shape[1])


def _describe(tm: TrackedModule) -> str:
    return f"weight {tm.out_features}x{tm.in_features}{' + bias' if tm.bias else ''}, {len(tm.blocks)} block(s)"


def backbone_match(
    model_a: nn.Module,
    model_b: nn.Module,
    tms_a: Sequence[TrackedModule],
    tms_b: Sequence[TrackedModule],
    strict: bool = True,
) -> list[TrackedModule]:
    """The tracked modules (with their blocks) that models A and B share, in A's order.

    Modules are matched by name; a shared module must have the same shape, bias, storage layout and
    block split in both lists, and the lists must agree with the models' actual weights. Typical use:
    A is the pre-trained causal LM, B the fine-tuned model (a causal LM or a classifier built from it);
    their embeddings and heads are not tracked, so they may differ.

    With ``strict=True`` (default) every tracked module of either model must be tracked in the other;
    with ``strict=False`` modules tracked in only one of them are left out (e.g. A tracked with
    ``modules="mlp"``), as long as at least one is shared.

    Raises:
        BackboneMismatchError: naming the first mismatch (different architectures, a module tracked
            in only one model, or a module whose shape or blocks differ).
    """
    type_a = getattr(getattr(model_a, "config", None), "model_type", None)
    type_b = getattr(getattr(model_b, "config", None), "model_type", None)
    if type_a != type_b:
        raise BackboneMismatchError(
            f"backbones do not match: model A is a {type_a!r} model and model B a {type_b!r} model"
        )
    by_b = {t.name: t for t in tms_b}
    names_a = {t.name for t in tms_a}
    shared = []
    for ta in tms_a:
        tb = by_b.get(ta.name)
        if tb is None:
            if strict:
                raise BackboneMismatchError(
                    f"backbones do not match: module {ta.name!r} is tracked in model A but not in model B"
                )
            continue
        _check_shared(model_a, model_b, ta, tb)
        shared.append(ta)
    if strict:
        for tb in tms_b:
            if tb.name not in names_a:
                raise BackboneMismatchError(
                    f"backbones do not match: module {tb.name!r} is tracked in model B but not in model A"
                )
    if not shared:
        raise BackboneMismatchError("backbones do not match: the two models share no tracked module")
    return shared


def _check_shared(model_a: nn.Module, model_b: nn.Module, ta: TrackedModule, tb: TrackedModule) -> None:
    """Raise :class:`BackboneMismatchError` unless module ``ta`` of A and ``tb`` of B (same name) agree with
    their models' weights and with each other in shape, bias, layout, role and blocks."""
    for which, model, t in (("A", model_a, ta), ("B", model_b, tb)):
        actual = _actual_shape(model, t, which)
        if actual != (t.out_features, t.in_features):
            raise BackboneMismatchError(
                f"tracked module {t.name!r} of model {which} says {t.out_features}x{t.in_features} but the "
                f"model's weight is {actual[0]}x{actual[1]}: recompute the tracked modules for this model"
            )
    if (ta.out_features, ta.in_features, ta.bias, ta.transposed) != (
        tb.out_features, tb.in_features, tb.bias, tb.transposed
    ) or ta.role != tb.role:
        raise BackboneMismatchError(
            f"backbones do not match at module {ta.name!r}: model A has {_describe(ta)} ({ta.role}), "
            f"model B has {_describe(tb)} ({tb.role})"
        )
    if ta.blocks != tb.blocks:
        raise BackboneMismatchError(
            f"backbones do not match at module {ta.name!r}: its blocks differ (model A: {len(ta.blocks)}, "
            f"model B: {len(tb.blocks)}); track both models with the same per_head setting"
        )
