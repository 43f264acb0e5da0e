"""Query vectors ``U = P_pt P_ft ∇m`` (ms-if), ``P_ft ∇m`` (ss-if) or ``∇m`` (gdp), per module
(docs/method.md §3), with ``P = (G + λI)⁻¹`` from EK-FAC factors, optionally refined by conjugate
gradients on the exact GGN of a sample of each stage's data (``refine_query``).

Dampings are arguments (defaults: the attributor's), so one attributor makes the vectors of any
number of dampings from one set of query gradients. :class:`QueryVectors` is the part of
:class:`~msif.influence.attribute.Attributor` that reads its models, factors and settings.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from ..curvature.factors import FactorError
from ..curvature.precondition import Factored, chain
from ..data.encoding import InputError
from .queries import PreparedQuery
from .scoring import LowRank, Split, largest_rank, low_rank, query_vector_elements

QUERY_GRAD_BYTES = 256 << 20  # query gradients formed at once (float32 bytes), besides the query vectors


def _stderr(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr)


class QueryVectors:
    """Preconditioning query gradients into query vectors, exact or refined, dense or low-rank."""

    def _need(self, fs, which):
        if fs is None:
            raise FactorError(f"method needs the {which} factors: fit them with `msif fit` and pass them")
        return fs

    def vector_dtype(self) -> torch.dtype:
        """Dtype of the query vectors: float64 when a model or a factor set is float64, else float32."""
        dts = [next(m.parameters()).dtype for m in (self.pt, self.ft) if m is not None]
        dts += [f.dtype for f in (self.pt_factors, self.ft_factors) if f is not None]
        return torch.float64 if torch.float64 in dts else torch.float32

    def query_vectors(self, grads: dict, method: str, damping_ft=None, damping_pt=None) -> dict[str, torch.Tensor]:
        """``U`` per module: ``P_pt P_ft g`` (ms-if), ``P_ft g`` (ss-if) or ``g`` (gdp), in
        :meth:`vector_dtype`; ``grads`` as :meth:`query_gradients` gives them (dense or factored).
        Dampings default to the attributor's."""
        dt = self.vector_dtype()
        damping_ft = self.damping_ft if damping_ft is None else damping_ft
        damping_pt = self.damping_pt if damping_pt is None else damping_pt
        if method == "gdp":
            return {n: g.dense(dt) if isinstance(g, Factored) else g.to(dt) for n, g in grads.items()}
        ft = self._need(self.ft_factors, "fine-tuned")
        missing = [n for n in grads if n not in ft.modules]
        if missing:
            raise FactorError(f"the fine-tuned factors do not cover module {missing[0]!r}; re-fit with --modules all")
        if method == "ss-if":
            return self._precondition([("ft", damping_ft)], grads, dt)
        pt = self._need(self.pt_factors, "pre-trained")
        common = [n for n in grads if n in pt.modules]
        if not common:
            raise FactorError("the pre-trained and fine-tuned factors share no module")
        return self._precondition([("ft", damping_ft), ("pt", damping_pt)], {n: grads[n] for n in common}, dt)

    def _precondition(self, stages: list[tuple[str, object]], grads: dict, dtype) -> dict[str, torch.Tensor]:
        """``(G_k+λ_k)⁻¹ ⋯ (G_1+λ_1)⁻¹ g`` over ``stages`` (``"ft"`` / ``"pt"`` with a damping): EK-FAC
        alone (:func:`chain`), or refined by :attr:`refine_query` CG steps per stage on the exact GGN
        of a sample of that stage's data (:func:`msif.curvature.refine.refined_chain`)."""
        factors = {"ft": self.ft_factors, "pt": self.pt_factors}
        if not self.refine_query:
            return chain([(factors[w], d) for w, d in stages], grads, dtype)
        from ..curvature.refine import Stage, refined_chain

        names = list(grads)
        st = [Stage(factors[w], d, self.gvp(w, names)) for w, d in stages]
        try:
            U, reps = refined_chain(st, grads, self.refine_query, dtype, tol=self.refine_tol)
        except ValueError as e:  # G + λ not positive definite along a CG direction: the damping is too small
            raise InputError(f"--refine-query: {e}") from None
        Q = next(iter(U.values())).shape[0]
        for (w, _), r in zip(stages, reps):
            self.refinements.append(dict(stage=w, queries=Q, train_step_s=self.gvp(w, names).step_seconds(), **r.summary()))
        return U

    def gvp(self, stage: str, modules: Sequence[str]):
        """The exact GGN-vector product of ``stage`` (``"pt"``: θ_pt on the pre-training sample, its
        factors' objective; ``"ft"``: θ_ft on the fine-tuning sample) over ``modules``; built once."""
        from ..curvature.gvp import GGNOperator

        key = (stage, tuple(modules))
        if key not in self._gvps:
            objective, batches = self._gvp_batches(stage)
            model, tms = (self.pt, self.tms_pt) if stage == "pt" else (self.ft, self.shared)
            keep = set(modules)
            self._gvps[key] = GGNOperator(model, [tm for tm in tms if tm.name in keep], batches, objective)
        return self._gvps[key]

    def _gvp_batches(self, stage: str) -> tuple[str, list]:
        """``(objective, batches)``: the first :attr:`gvp_examples` examples of the stage's data (a
        path, or an iterable of :class:`Batch`; default: where its factors were fitted)."""
        from pathlib import Path

        from ..data.examples import ExampleBatches, Fields

        fs = self.pt_factors if stage == "pt" else self.ft_factors
        meta = fs.meta if fs is not None else {}
        objective = meta.get("objective") or ("lm" if stage == "pt" else "classification" if self.classifier else "answer")
        data = self._stage_data[stage]
        flag = "--pretrained-data" if stage == "pt" else "--finetuned-data"
        recorded = (meta.get("data") or {}).get("path")
        if data is None and recorded is None:
            raise InputError(f"--refine-query needs the {'pre-training' if stage == 'pt' else 'fine-tuning'} data for its "
                             f"GGN-vector products: pass {flag} FILE (these factors do not record where they were fitted)")
        if data is None:
            data = recorded
            if not Path(data).exists():
                raise InputError(f"the {stage} factors were fitted on {data}, which no longer exists: pass {flag} FILE")
        if isinstance(data, (str, os.PathLike)):
            if not Path(data).exists():
                raise InputError(f"{flag} {data}: no such file or folder")
            f = self.fields or (Fields(**meta["data"]["fields"]) if (meta.get("data") or {}).get("fields") else Fields())
            data = ExampleBatches(data, self.tok if stage == "pt" else self.ft_tok, objective, batch_size=self.batch_size,
                                  fields=f, max_examples=self.gvp_examples, max_length=self.max_length, truncate=True)
        out, n = [], 0
        for b in data:
            if n >= self.gvp_examples:
                break
            keep = min(b.size, self.gvp_examples - n)
            out.append(b if keep == b.size else b.head(keep))
            n += keep
        return objective, out

    def refine_summary(self) -> dict | None:
        """Cost of the refined query vectors so far: per query, GGN-vector products and seconds, and
        those seconds as a multiple of one plain training step over each stage's sample."""
        if not self.refinements:
            return None
        out = {"iterations": self.refine_query, "stages": {}}
        for r in self.refinements:
            s = out["stages"].setdefault(r["stage"], {"queries": 0, "products": 0, "seconds": 0.0, "train_step_s": r["train_step_s"],
                                                      "max_relative_residual": 0.0})
            s["queries"] += r["queries"]
            s["products"] += r["products"]
            s["seconds"] += r["seconds"]
            s["max_relative_residual"] = max(s["max_relative_residual"], r["max_relative_residual"][-1] if r["max_relative_residual"] else 0.0)
        for w, s in out["stages"].items():
            q = max(1, s["queries"])
            s["products_per_query"] = s["products"] / q
            s["seconds_per_query"] = s["seconds"] / q
            s["train_steps_per_query"] = s["seconds_per_query"] / s["train_step_s"] if s["train_step_s"] > 0 else float("nan")
            s["gvp_examples"] = sum(b.size for b in next(g for k, g in self._gvps.items() if k[0] == w).batches)
        return out

    def vector_modules(self, method: str) -> list:
        """The tracked modules that carry a query vector for ``method`` (candidate-side objects)."""
        if method in ("ms-if",) and self.pt_factors is not None:
            return [tm for tm in self.shared if tm.name in self.pt_factors.modules]
        return list(self.shared)

    def choose_rank(self, n_queries: int, method: str, rank: int | None = None, max_memory: int | None = None, log=None) -> int | None:
        """``rank`` if given; else None (dense) when ``n_queries`` dense query vectors fit in ``max_memory``
        bytes, else the largest low-rank rank that fits (and says so through ``log``)."""
        if rank is not None or max_memory is None or method == "repsim":
            return rank
        from .stream import format_bytes

        tms = self.vector_modules(method)
        el = torch.finfo(self.vector_dtype()).bits // 8
        dense = n_queries * query_vector_elements(tms) * el
        if dense <= max_memory:
            return None
        r = largest_rank(tms, n_queries, max_memory, el)
        if r is None:
            raise InputError(
                f"the query vectors of {n_queries} queries do not fit in --max-memory {format_bytes(max_memory)} even at rank 1; "
                "attribute fewer queries at once or raise --max-memory"
            )
        used = n_queries * query_vector_elements(tms, r) * el
        (log or _stderr)(f"query vectors of {n_queries} queries would take {format_bytes(dense)} dense, over --max-memory "
                         f"{format_bytes(max_memory)}: using low-rank query vectors of rank {r} per block ({format_bytes(used)}); "
                         "--rank R forces a rank")
        return r

    def make_query_vectors(self, prepared: list[PreparedQuery], method: str, rank: int | None = None,
                           damping_ft=None, damping_pt=None) -> dict:
        """``U`` of every prepared query (module → :class:`~msif.influence.scoring.Split`, or
        :class:`~msif.influence.scoring.LowRank` with ``rank``). Gradients are made for as many queries at
        a time as fit :data:`QUERY_GRAD_BYTES` (factored where that is smaller, and so that one
        module's dense copy fits it too) and preconditioned one module at a time, each written into
        its rows of ``U`` (allocated once), so besides ``U`` only those gradients and one module's
        preconditioned copies exist. Dampings default to the attributor's (one stack of vectors per
        damping: call again with another). RepSim: the queries' mean last hidden states ``(Q, d)`` under
        the key ``"repsim"``."""
        if method == "repsim":
            return {"repsim": self._repsim_queries(prepared)}
        if method == "ss-if" and self.classifier:
            raise InputError(
                "single-stage IF needs the fine-tuned model to be a language model over the pre-training vocabulary; "
                f"{type(self.ft).__name__} has a classification head. Use --method ms-if (or gdp / repsim)."
            )
        keep = {tm.name for tm in self.vector_modules(method)}
        tmap = {tm.name: tm for tm in self.shared}
        Q, out = len(prepared), {}
        T = max(len(p.encoded.input_ids) for p in prepared)
        per_query = sum(min(tm.out_features * tm.in_dim, T * (tm.out_features + tm.in_dim)) for tm in self.shared) * 4
        widest = max(tm.out_features * tm.in_dim for tm in self.shared) * 4
        # gradients held at once ≤ QUERY_GRAD_BYTES (dense or factored), and so is one module's dense working copy
        step = max(1, min(QUERY_GRAD_BYTES // per_query, QUERY_GRAD_BYTES // widest))
        refine = self.refine_query > 0 and method != "gdp"
        if refine:  # CG holds six copies of every query's vector (refine.py): as many queries as fit QUERY_GRAD_BYTES
            step = max(1, QUERY_GRAD_BYTES // (6 * sum(tm.out_features * tm.in_dim for tm in self.shared) * 4))
        for i in range(0, Q, step):
            grads = self.query_gradients(prepared[i : i + step], factored=method != "gdp")
            j = min(Q, i + step)
            if refine:  # the exact GGN couples the modules: all of them at once
                grads = self.query_vectors(grads, method, damping_ft, damping_pt)
            for n in list(grads):
                g = grads.pop(n)
                if refine:  # already preconditioned, all modules together
                    v = g
                else:
                    if method == "ms-if":  # the ft factors must cover every shared module (query_vectors says so)
                        self._need(self.ft_factors, "fine-tuned")
                        if n not in keep:
                            if n not in self.ft_factors.modules:
                                self.query_vectors({n: g}, "ss-if", damping_ft)  # raises the missing-module error
                            continue
                    v = self.query_vectors({n: g}, method, damping_ft, damping_pt)[n]
                del g
                if rank is not None:
                    v = low_rank({n: v}, [tmap[n]], rank)[n]
                if isinstance(v, LowRank):
                    if n not in out:
                        out[n] = LowRank(v.X.new_empty((Q, *v.X.shape[1:])), v.Y.new_empty((Q, *v.Y.shape[1:])))
                    out[n].X[i:j], out[n].Y[i:j] = v.X, v.Y
                else:
                    tm = tmap[n]
                    if n not in out:
                        out[n] = Split.empty(Q, tm, v.dtype, v.device)
                    out[n].W[i:j] = v[..., : tm.in_features]
                    if tm.bias:
                        out[n].b[i:j] = v[..., tm.in_features]
                del v
            del grads
        if not out:
            raise FactorError("the pre-trained and fine-tuned factors share no module")
        return out

    def resolved_dampings(self, method: str, damping_ft=None, damping_pt=None) -> dict[str, float]:
        """The absolute λ of each stage ``method`` preconditions with (defaults: the attributor's)."""
        damping_ft = self.damping_ft if damping_ft is None else damping_ft
        damping_pt = self.damping_pt if damping_pt is None else damping_pt
        d = {}
        if method in ("ms-if", "ss-if") and self.ft_factors is not None:
            d["ft"] = self.ft_factors.resolve_damping(damping_ft)
        if method == "ms-if" and self.pt_factors is not None:
            d["pt"] = self.pt_factors.resolve_damping(damping_pt)
        return d
