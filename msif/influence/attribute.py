"""Attribution of a fine-tuned model's outputs to pre-training documents (PAPER_NOTES §3-4).

Methods (score of a pre-training document ``z`` for a query ``x`` with answer ``y``; larger = more
supportive, i.e. up-weighting ``z`` lowers the query loss ``m = −log p(y | x)``):

* ``ms-if`` — multi-stage influence ``∇m(θ_ft)ᵀ (G_ft+λ_ft)⁻¹ (G_pt+λ_pt)⁻¹ ∇ℓ_pt(z, θ_pt)``, over the
  backbone blocks the two models share. Works when fine-tuning replaced the head.
* ``ss-if`` — single-stage ``∇m(θ_ft)ᵀ (G_ft+λ_ft)⁻¹ ∇ℓ_pt(z, θ_ft)``; needs a fine-tuned causal LM.
* ``gdp`` — gradient dot product ``∇m(θ_ft)ᵀ ∇ℓ_pt(z, θ_pt)`` (no curvature; candidates on θ_pt so that
  it also applies to a classification fine-tune).
* ``repsim`` — cosine of mean last-layer hidden states, query on θ_ft, candidate on θ_pt.

A query is turned once into ``U = P_pt P_ft ∇m`` per block; candidates are streamed in batches through
θ_pt with hooks (:mod:`msif.influence.scoring`). No per-candidate iHVP, no parameter gradients.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ..curvature.factors import FactorError, FactorSet
from ..curvature.hooks import per_example_factors, per_example_grads
from ..curvature.precondition import Factored, chain
from ..data.encoding import Encoded, InputError, collate, encode_classification, encode_prompt, encode_prompt_answer, encode_text, pad_token_id
from ..distributed import barrier, gather_objects, world
from ..models.adapters import tracked_modules
from .scoring import LowRank, ScoreResult, Split, largest_rank, low_rank, query_vector_elements, score_batches

METHODS = ("ms-if", "ss-if", "gdp", "repsim")
PAD_MULTIPLE = 32  # candidate batches are padded to a multiple of this many tokens
QUERY_GRAD_BYTES = 256 << 20  # query gradients formed at once (float32 bytes), besides the query vectors


@dataclass
class Query:
    """A question to the fine-tuned model: ``prompt`` and its ``answer`` (None: greedy-decode one).

    For a classification fine-tune, ``label`` (None: the model's predicted class) replaces the answer.
    """

    prompt: str
    answer: str | None = None
    label: int | None = None
    id: str | None = None


@dataclass
class PreparedQuery:
    query: Query
    prompt_text: str  # after the template
    answer: str | None
    label: int | None
    encoded: Encoded
    generated: bool = False


@dataclass
class Attribution:
    """Result of :meth:`Attributor.attribute`: scores of candidates (corpus rows) for each query."""

    method: str
    queries: list[PreparedQuery]
    rows: list[list[int]]  # per query: candidate corpus rows, best first
    doc_ids: list[list[str]]
    scores: list[list[float]]
    texts: list[list[str]] = field(default_factory=list)
    token_scores: list[list[list[float]]] | None = None  # per query, per candidate, per token
    tokens: list[list[list[str]]] | None = None
    role_share: list[dict[str, float]] | None = None  # per query: share of |influence| by mlp / attention
    layer_share: list[dict[str, float]] | None = None
    dampings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> list[dict]:
        out = []
        for qi, pq in enumerate(self.queries):
            hits = []
            for r in range(len(self.rows[qi])):
                h = {"rank": r + 1, "doc_id": self.doc_ids[qi][r], "row": self.rows[qi][r], "score": self.scores[qi][r]}
                if self.texts:
                    h["text"] = self.texts[qi][r]
                if self.token_scores is not None:
                    h["tokens"] = self.tokens[qi][r]
                    h["token_scores"] = self.token_scores[qi][r]
                hits.append(h)
            d = {"query_id": pq.query.id, "prompt": pq.query.prompt, "answer": pq.answer, "label": pq.label,
                 "generated": pq.generated, "method": self.method, "results": hits, "damping": self.dampings}
            if self.role_share is not None:
                d["role_share"] = self.role_share[qi]
                d["layer_share"] = self.layer_share[qi]
            out.append(d)
        return out


def _load(model, task):
    if isinstance(model, (str, os.PathLike)):
        from ..models.loading import load_model

        return load_model(str(model), task=task)
    return model


def _is_classifier(model: nn.Module) -> bool:
    return "ForSequenceClassification" in type(model).__name__


class Attributor:
    """Everything needed to attribute a fine-tuned model's outputs to pre-training documents.

    ``pretrained`` / ``finetuned``: models or checkpoint paths (the fine-tuned one may be a sequence
    classifier built on the pre-trained causal LM). ``pt_factors`` / ``ft_factors``: :class:`FactorSet`
    or folders (``None`` when the method needs none). Dampings: absolute floats or ``"0.1x"`` (relative
    to the factors' mean eigenvalue).
    """

    def __init__(
        self,
        pretrained,
        finetuned,
        tokenizer,
        pt_factors: FactorSet | str | None = None,
        ft_factors: FactorSet | str | None = None,
        ft_tokenizer=None,
        damping_pt="0.1x",
        damping_ft="0.1x",
        template: str = "plain",
        batch_size: int = 8,
        max_length: int | None = None,
        truncate: bool = False,
        max_new_tokens: int = 16,
        device: str = "cpu",
        check_fingerprints: bool = True,
        refine_query: int = 0,
        pretrained_data=None,
        finetuned_data=None,
        gvp_examples: int = 64,
        refine_tol: float = 0.0,
        fields=None,
    ):
        from ..models.loading import load_tokenizer

        if refine_query < 0:
            raise InputError(f"--refine-query must be ≥ 0 (CG steps per stage; 0: EK-FAC alone), not {refine_query}")
        if gvp_examples < 1:
            raise InputError(f"--gvp-examples must be ≥ 1, not {gvp_examples}")
        if not refine_tol >= 0:
            raise InputError(f"the refinement tolerance must be ≥ 0, not {refine_tol}")

        self.pt = _load(pretrained, "causal_lm").to(device).eval()
        self.ft = _load(finetuned, "auto").to(device).eval()
        self.tok = load_tokenizer(str(tokenizer)) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        ftt = ft_tokenizer if ft_tokenizer is not None else self.tok
        self.ft_tok = load_tokenizer(str(ftt)) if isinstance(ftt, (str, os.PathLike)) else ftt
        # only what preconditioning needs (no covariance sums), where the query gradients are made
        load = lambda f: FactorSet.load(f, for_scoring=True, device=device) if isinstance(f, (str, os.PathLike)) else f  # noqa: E731
        self.pt_factors, self.ft_factors = load(pt_factors), load(ft_factors)
        self.damping_pt, self.damping_ft = damping_pt, damping_ft
        if template not in ("plain", "chat"):
            raise ValueError("template must be 'plain' or 'chat'")
        self.template = template
        self.batch_size = batch_size
        context = getattr(self.pt.config, "max_position_embeddings", None)
        if max_length is not None and context is not None and max_length > context:
            raise InputError(f"--max-length {max_length} is longer than the pre-trained model's context of {context} "
                             "positions; give at most that")
        self.max_length = max_length or context
        from ..models.loading import check_tokenizer

        check_tokenizer(self.pt, self.tok)  # a larger vocabulary than the embedding: one line, not an IndexError
        if self.ft_tok is not self.tok:
            check_tokenizer(self.ft, self.ft_tok)
        self.truncate = truncate
        self.max_new_tokens = max_new_tokens
        self.device = device
        self.classifier = _is_classifier(self.ft)
        per_head = True
        for f in (self.pt_factors, self.ft_factors):
            if f is not None:
                per_head = f.meta.get("per_head", True)
        self.tms_pt = tracked_modules(self.pt, per_head=per_head)
        self.tms_ft = tracked_modules(self.ft, per_head=per_head)
        from ..models.loading import backbone_match, model_fingerprint

        self.shared = backbone_match(self.ft, self.pt, self.tms_ft, self.tms_pt)
        self.refine_query, self.refine_tol, self.gvp_examples, self.fields = refine_query, refine_tol, gvp_examples, fields
        self._stage_data = {"pt": pretrained_data, "ft": finetuned_data}
        self._gvps: dict = {}
        self.refinements: list[dict] = []  # one record per refined solve (stage, queries, iterations, products, time)
        if check_fingerprints:
            if self.pt_factors is not None:
                self._check(self.pt_factors, self.pt, "pre-trained model", model_fingerprint)
            if self.ft_factors is not None:
                self._check(self.ft_factors, self.ft, "fine-tuned model", model_fingerprint)
            from ..models.loading import tokenizer_fingerprint

            for fs, tok, what in ((self.pt_factors, self.tok, "pre-trained"), (self.ft_factors, self.ft_tok, "fine-tuned")):
                want = None if fs is None else fs.meta.get("tokenizer")
                if want is not None and tokenizer_fingerprint(tok) not in (None, want):
                    raise FactorError(f"the {what} factors were fitted with another tokenizer (a different vocabulary): "
                                      "pass the tokenizer they were fitted with (--tokenizer), or re-fit them with this one")

    @staticmethod
    def _check(fs: FactorSet, model, what, model_fingerprint):
        tms = tracked_modules(model, per_head=fs.meta.get("per_head", True), modules=fs.meta.get("module_subset", "all"))
        fs.check_model(model_fingerprint(model, tms), what)

    # ------------------------------------------------------------------------------ queries
    def _prompt_text(self, prompt: str) -> str:
        if self.template == "plain":
            return prompt
        if not getattr(self.ft_tok, "chat_template", None):
            raise InputError("the fine-tuned tokenizer has no chat template; use template='plain' (CLI: --template plain)")
        return self.ft_tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)

    @torch.no_grad()
    def generate(self, prompt_text: str) -> tuple[Encoded, str]:
        """Greedy-decode an answer from the fine-tuned model; returns the encoded pair and its text."""
        if self.classifier:
            raise InputError("a classification model does not generate text")
        prompt_ids = encode_prompt(self.ft_tok, prompt_text)
        if not prompt_ids:
            raise InputError("the prompt is empty")
        n_prompt = len(prompt_ids)
        room = self.max_new_tokens if self.max_length is None else min(self.max_new_tokens, self.max_length - n_prompt)
        if room < 1:
            raise InputError(f"the prompt is {n_prompt} tokens long, leaving no room for an answer within max_length={self.max_length}")
        ids = torch.tensor([prompt_ids], device=self.device)
        eos = self.ft_tok.eos_token_id
        out = self.ft.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=room, do_sample=False,
                               pad_token_id=pad_token_id(self.ft_tok), eos_token_id=eos)
        new = out[0, n_prompt:].tolist()
        if eos is not None and eos in new:
            new = new[: new.index(eos)]
        text = self.ft_tok.decode(new)
        if "\n" in text:  # stop at the end of the line
            text = text[: text.index("\n")]
            new = self.ft_tok(text, add_special_tokens=False)["input_ids"]
        if not text.strip() or not new:
            raise InputError(f"the fine-tuned model generated an empty answer to {prompt_text!r}; give an answer explicitly")
        ids_all = prompt_ids + new
        tm = [False] * len(ids_all)
        for t in range(n_prompt - 1, len(ids_all) - 1):
            tm[t] = True
        return Encoded(ids_all, tm), text

    def prepare(self, queries: Sequence[Query]) -> list[PreparedQuery]:
        """Apply the template, generate missing answers (or predict missing labels), encode."""
        if not queries:
            raise InputError("no queries given")
        out = []
        for i, q in enumerate(queries):
            if not isinstance(q.prompt, str) or not q.prompt.strip():
                raise InputError(f"query {i}: the prompt is empty")
            pt = self._prompt_text(q.prompt)
            if self.classifier:
                label = q.label
                if label is None:
                    enc = encode_classification(self.ft_tok, pt, 0, max_length=self.max_length, index=i)
                    with torch.no_grad():
                        b = collate([enc], pad_id=pad_token_id(self.ft_tok)).to(self.device)
                        label = int(self.ft(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.argmax(-1))
                n_labels = self.ft.config.num_labels
                if not 0 <= int(label) < n_labels:
                    raise InputError(f"query {i}: label {label} is outside the classifier's {n_labels} classes")
                enc = encode_classification(self.ft_tok, pt, int(label), max_length=self.max_length, index=i)
                out.append(PreparedQuery(q, pt, None, int(label), enc, generated=q.label is None))
                continue
            if q.answer is None:
                enc, ans = self.generate(pt)
                enc.index = i
                out.append(PreparedQuery(q, pt, ans, None, enc, generated=True))
            else:
                enc = encode_prompt_answer(self.ft_tok, pt, q.answer, max_length=self.max_length, index=i)
                out.append(PreparedQuery(q, pt, q.answer, None, enc))
        return out

    def query_gradients(self, prepared: list[PreparedQuery], factored: bool = False) -> dict:
        """``∇m(θ_ft)`` per shared module, ``(Q, out, in_dim)``, ``m = −log p(answer | prompt)``;
        with ``factored``, as :class:`~msif.curvature.precondition.Factored` ``s_qᵀ a_q`` for modules
        where that is smaller than the dense matrix."""
        objective = "classification" if self.classifier else "answer"
        parts: dict[str, list] = {}
        for i in range(0, len(prepared), self.batch_size):
            b = collate([p.encoded for p in prepared[i : i + self.batch_size]], pad_id=pad_token_id(self.ft_tok)).to(self.device)
            for n, f in per_example_factors(self.ft, self.shared, b, objective).items():
                if not (torch.isfinite(f.s).all() and torch.isfinite(f.a).all()):
                    raise FloatingPointError("the query gradient is NaN or infinite: check the fine-tuned model")
                parts.setdefault(n, []).append(f)
        out = {}
        for n, fs in parts.items():
            f = Factored.cat(fs)
            out[n] = f if factored and f.worth_it() else torch.cat([x.dense() for x in fs])
        return out

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

    def make_query_vectors(self, prepared: list[PreparedQuery], method: str, rank: int | None = None) -> dict:
        """``U`` of every prepared query (module → :class:`~msif.influence.scoring.Split`, or
        :class:`~msif.influence.scoring.LowRank` with ``rank``). Gradients are made for as many queries at
        a time as fit :data:`QUERY_GRAD_BYTES` (factored where that is smaller, and so that one
        module's dense copy fits it too) and preconditioned one module at a time, each written into
        its rows of ``U`` (allocated once), so besides ``U`` only those gradients and one module's
        preconditioned copies exist. RepSim: the queries' mean last hidden states ``(Q, d)`` under
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
                grads = self.query_vectors(grads, method)
            for n in list(grads):
                g = grads.pop(n)
                if refine:  # already preconditioned, all modules together
                    v = g
                else:
                    if method == "ms-if":  # the ft factors must cover every shared module (query_vectors says so)
                        self._need(self.ft_factors, "fine-tuned")
                        if n not in keep:
                            if n not in self.ft_factors.modules:
                                self.query_vectors({n: g}, "ss-if")  # raises the missing-module error
                            continue
                    v = self.query_vectors({n: g}, method)[n]
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

    def release(self, method: str) -> None:
        """Free what only the query vectors need: both factor sets and, unless it scores the
        candidates (ss-if), the fine-tuned model. The attributor can then only score."""
        import gc

        self.pt_factors = self.ft_factors = None
        if method != "ss-if" and self.ft is not self.pt:
            self.ft = None
        gc.collect()

    def candidate_model(self, method: str) -> nn.Module:
        return self.ft if method == "ss-if" else self.pt

    # ---------------------------------------------------------------------------- candidates
    def encode_candidates(self, texts: Sequence[str], rows: Sequence[int]) -> list[Encoded]:
        return [encode_text(self.tok, t, max_length=self.max_length, truncate=self.truncate, index=int(r)) for t, r in zip(texts, rows)]

    def _candidate_batches(self, encoded: list[Encoded]):
        """Batches of similar lengths, right-padded to a multiple of :data:`PAD_MULTIPLE` tokens: a few
        batch shapes instead of one per length, so the allocator reuses its blocks and memory does not
        creep up over a long stream (padding is exact: its output gradients are zero)."""
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
        pid = pad_token_id(self.tok)
        for i in range(0, len(order), self.batch_size):
            ex = [encoded[j] for j in order[i : i + self.batch_size]]
            T = -(-max(len(e.input_ids) for e in ex) // PAD_MULTIPLE) * PAD_MULTIPLE
            if self.max_length is not None:
                T = min(T, self.max_length)
            yield collate(ex, pad_id=pid, pad_to=T).to(self.device)

    def score(self, prepared: list[PreparedQuery], texts: Sequence[str], rows: Sequence[int] | None = None,
              method: str = "ms-if", per_token: bool = False, rank: int | None = None) -> ScoreResult:
        """Scores ``(Q, N)`` of candidate ``texts`` (in the given order) for prepared queries, all in one
        pass (the reference; :meth:`attribute` streams)."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {method!r}")
        if len(texts) == 0:
            raise InputError("no candidate documents to score")
        rows = list(range(len(texts))) if rows is None else [int(r) for r in rows]
        U = self.make_query_vectors(prepared, method, rank)
        res = self.score_texts(U, texts, method, per_token=per_token)
        res.indices = torch.tensor(rows, device="cpu")
        return res

    def score_texts(self, U: dict, texts: Sequence[str], method: str, per_token: bool = False) -> ScoreResult:
        """Scores of ``texts`` against query vectors ``U`` of :meth:`make_query_vectors`, in the
        texts' order (``indices`` are positions in ``texts``)."""
        if method == "repsim":
            return self._repsim_scores(U["repsim"], texts)
        enc = self.encode_candidates(texts, range(len(texts)))
        res = score_batches(self.candidate_model(method), self.shared, U, self._candidate_batches(enc), objective="lm",
                            per_token=per_token)
        order = torch.argsort(res.indices)  # back to the texts' order
        res.scores = res.scores[:, order.to(res.scores.device)]
        res.per_module = res.per_module[:, order.to(res.per_module.device)]
        if res.per_token is not None:
            res.per_token = [res.per_token[int(i)] for i in order]
        res.indices = res.indices[order]
        return res

    @torch.no_grad()
    def _mean_hidden(self, model, batches) -> torch.Tensor:
        out = []
        for b in batches:
            h = model(input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True).hidden_states[-1]
            m = b.attention_mask.unsqueeze(-1).to(h.dtype)
            out.append(((h * m).sum(1) / m.sum(1)).double())
        return torch.cat(out)

    def _repsim_queries(self, prepared) -> torch.Tensor:
        pid_q = pad_token_id(self.ft_tok)
        return self._mean_hidden(self.ft, [collate([p.encoded], pad_id=pid_q).to(self.device) for p in prepared])

    def _repsim_scores(self, q: torch.Tensor, texts) -> ScoreResult:
        enc = self.encode_candidates(texts, range(len(texts)))
        pid = pad_token_id(self.tok)
        c = self._mean_hidden(self.pt, [collate(enc[i : i + self.batch_size], pad_id=pid).to(self.device) for i in range(0, len(enc), self.batch_size)])
        if q.shape[1] != c.shape[1]:
            raise InputError("the two models' hidden sizes differ; RepSim needs the same backbone")
        s = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(c, dim=-1).T
        return ScoreResult(scores=s, per_module=s.unsqueeze(-1), modules=["hidden_states[-1]"],
                           indices=torch.arange(len(texts), device="cpu"), roles=["representation"])

    def self_influence(self, texts: Sequence[str], damping=None) -> torch.Tensor:
        """``∇ℓ(z)ᵀ (G_pt+λ)⁻¹ ∇ℓ(z)`` for each text on θ_pt (``(N,)``); with :attr:`refine_query`, the
        inverse refined by CG on the exact GGN of the pre-training sample."""
        pt = self._need(self.pt_factors, "pre-trained")
        damping = self.damping_pt if damping is None else damping
        enc = self.encode_candidates(texts, range(len(texts)))
        out = torch.empty(len(texts), dtype=torch.float64)
        for b in self._candidate_batches(enc):
            g = per_example_grads(self.pt, [tm for tm in self.shared if tm.name in pt.modules], b, "lm")
            p = self._precondition([("pt", damping)], g, self.vector_dtype()) if self.refine_query else pt.precondition(g, damping)
            out[b.indices] = sum((p[n].double() * g[n].double()).sum((-1, -2)) for n in g)
        return out

    # --------------------------------------------------------------------------- whole thing
    def attribute(self, queries: Sequence[Query | PreparedQuery], corpus, candidates: Sequence[Sequence[int]] | None = None,
                  method: str = "ms-if", top: int = 10, per_token: bool = True, rank: int | None = None,
                  text_field: str = "text", chunk_size: int = 1024, scores_out=None, max_memory: int | None = None,
                  dtype: torch.dtype | None = None, release: bool = False, progress: bool = False, log=None) -> Attribution:
        """Rank candidate rows of ``corpus`` (a :class:`msif.data.corpus.Corpus` or a list of texts) per query.

        ``candidates``: per query, the corpus rows to rerank (e.g. from the embedding index); ``None``
        (for all queries, or one query) scores every document. Queries sharing a candidate set share one pass. The candidates stream
        ``chunk_size`` at a time (:mod:`msif.influence.stream`): per query only a running top-``top``
        and the sums of |per-module score| are kept, and per-token scores are recomputed for the final
        top documents alone. ``scores_out``: folder for the whole score matrix in float32 shards
        (resumable; one candidate set only). ``max_memory``: bytes the query vectors may take (above it
        they become low-rank, see :meth:`choose_rank`). ``release``: free the factors and the
        fine-tuned model once the query vectors exist. ``dtype``: cast the candidate model to it
        after the query vectors are made (bf16 / fp16 scores are checked against float32 on the
        first candidates). Already prepared queries (:meth:`prepare`) are used as they are.
        """

        log = log or _stderr
        todo = [q for q in queries if not isinstance(q, PreparedQuery)]
        done = iter(self.prepare(todo)) if todo else iter(())
        prepared = [q if isinstance(q, PreparedQuery) else next(done) for q in queries]
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {method!r}")
        texts_of = (lambda rows: corpus.texts(rows)) if hasattr(corpus, "texts") else (lambda rows: [corpus[r] for r in rows])
        ids_of = (lambda rows: corpus.doc_ids(rows)) if hasattr(corpus, "doc_ids") else (lambda rows: [str(r) for r in rows])
        n_docs = len(corpus)
        if n_docs == 0:
            raise InputError("no candidate documents to score")
        if candidates is not None and len(candidates) != len(prepared):
            raise ValueError("give one candidate list per query")
        groups: dict[tuple | None, list[int]] = {}
        for qi in range(len(prepared)):
            c = None if candidates is None or candidates[qi] is None else tuple(int(r) for r in candidates[qi])
            groups.setdefault(None if c is not None and c == tuple(range(n_docs)) else c, []).append(qi)
        if scores_out is not None and len(groups) > 1:
            raise InputError("--scores-out stores one (queries × documents) matrix: give every query the same candidates "
                             "(e.g. --retriever all)")
        att = Attribution(method, prepared, [None] * len(prepared), [None] * len(prepared), [None] * len(prepared),
                          texts=[None] * len(prepared), dampings=self._resolved_dampings(method))
        want_tokens = per_token and method != "repsim"
        if want_tokens:
            att.token_scores, att.tokens = [None] * len(prepared), [None] * len(prepared)
        if method != "repsim":
            att.role_share, att.layer_share = [None] * len(prepared), [None] * len(prepared)
        rank = self.choose_rank(len(prepared), method, rank, max_memory, log)
        store_inputs = self._store_inputs(prepared, corpus, method, rank, dtype, chunk_size, top, att.dampings) if scores_out is not None else None
        vectors = {rows: self.make_query_vectors([prepared[q] for q in qis], method, rank) for rows, qis in groups.items()}
        if release:
            self.release(method)
        if dtype is not None:
            self.candidate_model(method).to(dtype)
        self.held = 0  # most candidates held at once per query (memory bound, for tests)
        w = world()
        for (rows, qis), U in zip(groups.items(), vectors.values()):
            n = n_docs if rows is None else len(rows)
            first = rows[: min(n, 8)] if rows is not None else list(range(min(n, 8)))
            if w.main:
                self.check_precision(U, method, texts_of(first), log)
            store = None
            if scores_out is not None:
                store = self._open_store(scores_out, store_inputs, [_query_json(prepared[q]) for q in qis], n, chunk_size)
            best, absm = self._stream(U, method, corpus, rows, len(qis), min(top, n), chunk_size, store, progress and w.main)
            if store is not None:
                barrier("finishing the score shards")
                if w.main:
                    store.refresh()
            if w.main:
                self.held = max(self.held, best.max_held)
                self._fill(att, qis, best, absm, U, method, texts_of, ids_of, want_tokens)
            del U
        vectors.clear()
        return att if w.main else None

    @staticmethod
    def _open_store(folder, inputs, queries, n, chunk_size):
        """The score-shard folder; with several ranks rank 0 creates it first and alone keeps its manifest."""
        from .stream import ShardStore

        w = world()
        store = ShardStore.open(folder, inputs, queries, n, chunk_size) if w.main else None
        barrier("opening the score shards")
        if not w.main:
            store = ShardStore.open(folder, inputs, queries, n, chunk_size, writer=False)
        return store

    def _stream(self, U, method, corpus, rows, n_queries, k, chunk_size, store, progress):
        """Top-``k`` per query over the candidates (chunk by chunk) and the sums of |per-module score|."""
        import sys

        from tqdm.auto import tqdm

        from .stream import TopK, iter_chunks

        best = TopK(n_queries, k)
        absm = None
        cached = {}
        w = world()
        total = len(corpus) if rows is None else len(rows)
        bar = tqdm(total=total, unit="doc", desc="scoring", file=sys.stderr, disable=not progress, dynamic_ncols=True,
                   smoothing=0.1)

        def skip(i):  # another rank's chunk, or one already in the store: its texts are not read
            return not w.mine(i) or (store is not None and self._cached(store, i, cached))

        try:
            for chunk in iter_chunks(corpus, rows, chunk_size, skip=skip):
                if not w.mine(chunk.index):
                    continue
                shard = cached.pop(chunk.index, None)
                if shard is not None and shard["rows"].tolist() == chunk.rows:
                    part_s, part_r, chunk_abs = shard["topk_scores"], shard["topk_rows"], shard["abs_per_module"]
                else:
                    if not chunk.texts:  # a cached shard that did not match its rows after all
                        chunk.texts = list(corpus.texts(chunk.rows)) if hasattr(corpus, "texts") else [corpus[r] for r in chunk.rows]
                    res = self.score_texts(U, chunk.texts, method)
                    part = TopK(n_queries, k)
                    part.update(res.scores, chunk.rows)
                    part_s, part_r = part.scores, part.rows
                    chunk_abs = res.per_module.abs().sum(1).to("cpu", torch.float64)
                    if store is not None:
                        store.save(chunk.index, res.scores, chunk.rows, part, chunk_abs)
                    del res
                best.update(part_s, part_r)
                best.max_held = max(best.max_held, len(chunk.rows) + k)
                absm = chunk_abs.clone() if absm is None else absm + chunk_abs
                bar.update(min(len(chunk.rows) * w.size, total - bar.n))  # rank 0's share stands for every rank's
        finally:
            bar.close()
        if not w.active:
            return best, absm
        parts = gather_objects((best.scores, best.rows, best.max_held, absm), "collecting the ranks' top documents")
        if not w.main:
            return None, None
        position = None if rows is None else {int(r): i for i, r in enumerate(rows)}
        merged = TopK.merged([(sc, rw) for sc, rw, _, _ in parts], k, position)
        merged.max_held = max(h for _, _, h, _ in parts)
        absm = sum(a for *_, a in parts if a is not None)
        return merged, absm

    @staticmethod
    def _cached(store, i, cached) -> bool:
        """Chunk ``i``'s shard exists (kept in ``cached`` for the loop; its rows are checked there)."""
        p = store.path(i)
        if not p.exists():
            return False
        from safetensors.torch import load_file

        try:
            cached[i] = load_file(str(p))
        except Exception:  # noqa: BLE001  (damaged or foreign: recompute)
            return False
        return "rows" in cached[i] and "topk_rows" in cached[i]

    def _fill(self, att, qis, best, absm, U, method, texts_of, ids_of, want_tokens):
        """Results of one candidate group: rows, ids, scores, texts, per-token scores (a second pass
        over the top documents only) and role / layer shares."""
        union = sorted({r for j in range(len(qis)) for r in best.best(j)[0]})
        texts = dict(zip(union, texts_of(union)))
        modules = [tm.name for tm in self.shared if tm.name in U]
        roles = [tm.role for tm in self.shared if tm.name in U]
        for j, qi in enumerate(qis):
            rows, scores = best.best(j)
            att.rows[qi], att.scores[qi] = rows, scores
            att.doc_ids[qi] = ids_of(rows)
            att.texts[qi] = [texts[r] for r in rows]
            if want_tokens:  # this query's top documents only: a pass over k documents with one query vector
                res = self.score_texts(_one_query(U, j), att.texts[qi], method, per_token=True)
                att.token_scores[qi] = [t[0].tolist() for t in res.per_token]
                att.tokens[qi] = [self._token_strings(t) for t in att.texts[qi]]
            if att.role_share is not None:
                att.role_share[qi] = _role_shares(absm[j], roles)
                att.layer_share[qi] = _layer_shares(absm[j], modules, roles)

    # ------------------------------------------------------------------------ precision, inputs
    def check_precision(self, U, method: str, texts: Sequence[str], log=None) -> dict | None:
        """For a bf16 / fp16 candidate model: scores of ``texts`` (a few candidates) against float32
        (the model cast to float32 in place and back, an exact round trip); warns through ``log``
        when their Spearman is below 0.9. Returns the comparison (None for a float32/64 model)."""
        from .stream import precision_report

        model = self.candidate_model(method)
        low = next(model.parameters()).dtype
        if low not in (torch.bfloat16, torch.float16) or method == "repsim" or len(texts) < 2:
            return None
        s_low = self.score_texts(U, texts, method).scores
        model.to(torch.float32)
        try:
            s_hi = self.score_texts(U, texts, method).scores
        finally:
            model.to(low)
        rep = precision_report(s_low, s_hi, str(low).removeprefix("torch."))
        if rep["warning"]:
            (log or _stderr)(rep["warning"])
        return rep

    def _store_inputs(self, prepared, corpus, method, rank, dtype, chunk_size, top, dampings) -> dict:
        """What a stored score matrix depends on (compared key by key when a run resumes)."""
        import hashlib
        import json

        from ..models.loading import model_fingerprint

        def fp_model(m, tms):
            return None if m is None else model_fingerprint(m, tms)

        if hasattr(corpus, "fingerprint"):
            c = corpus.fingerprint()
            corp = {k: c[k] for k in ("n_rows", "sample_sha256", "text_field", "id_field")}
        else:
            corp = {"n_rows": len(corpus), "sha256": hashlib.sha256("\0".join(corpus).encode()).hexdigest()}
        queries = [_query_json(p) for p in prepared]
        cand = self.candidate_model(method)
        return {
            "method": method,
            "pretrained": fp_model(self.pt, self.tms_pt),
            "finetuned": fp_model(self.ft, self.tms_ft),
            "pretrained_factors": None if self.pt_factors is None or method != "ms-if" else self.pt_factors.meta.get("sha256"),
            "finetuned_factors": None if self.ft_factors is None or method == "gdp" else self.ft_factors.meta.get("sha256"),
            "dampings": dampings,
            "rank": rank,
            "dtype": str(dtype or next(cand.parameters()).dtype).removeprefix("torch."),
            "corpus": corp,
            "queries": hashlib.sha256(json.dumps(queries, sort_keys=True).encode()).hexdigest()[:20],
            "max_length": self.max_length,
            "truncate": self.truncate,
            "chunk_size": chunk_size,
            "top": top,
        }

    def _token_strings(self, text: str) -> list[str]:
        enc = encode_text(self.tok, text, max_length=self.max_length, truncate=True)
        return [self.tok.decode([t]) for t in enc.input_ids]

    def _resolved_dampings(self, method: str) -> dict[str, float]:
        d = {}
        if method in ("ms-if", "ss-if") and self.ft_factors is not None:
            d["ft"] = self.ft_factors.resolve_damping(self.damping_ft)
        if method == "ms-if" and self.pt_factors is not None:
            d["pt"] = self.pt_factors.resolve_damping(self.damping_pt)
        return d


def _stderr(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr)


def _one_query(U: dict, j: int) -> dict:
    """Query ``j``'s vectors alone (views, no copy)."""
    return {n: LowRank(v.X[j : j + 1], v.Y[j : j + 1]) if isinstance(v, LowRank) else v.rows(j, j + 1) if isinstance(v, Split)
            else v[j : j + 1] for n, v in U.items()}


def _query_json(p: PreparedQuery) -> dict:
    return {"id": p.query.id, "prompt": p.prompt_text, "answer": p.answer, "label": p.label}


def _role_shares(absm: torch.Tensor, roles: list[str]) -> dict[str, float]:
    """Share of |influence| per role (mlp / attention) from the sums of |per-module score| ``(M,)``."""
    tot = float(absm.sum()) or 1.0
    return {r: float(sum(v for v, x in zip(absm.tolist(), roles) if x == r)) / tot for r in sorted(set(roles))}


def _layer_shares(absm: torch.Tensor, modules: list[str], roles: list[str]) -> dict[str, float]:
    """Share of |influence| per (layer, role), e.g. ``{"layer 0 mlp": 0.4, ...}``, from ``absm (M,)``."""
    import re

    tot = float(absm.sum()) or 1.0
    out: dict[str, float] = {}
    for name, role, v in zip(modules, roles, absm.tolist()):
        m = re.search(r"\.(\d+)\.", name)
        key = f"layer {m.group(1) if m else '?'} {role}"
        out[key] = out.get(key, 0.0) + v / tot
    return out
