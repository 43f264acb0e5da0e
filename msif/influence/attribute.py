"""Attribution of a fine-tuned model's outputs to pre-training documents (docs/method.md §3–4).

Methods (score of a pre-training document ``z`` for a query ``x`` with answer ``y``; larger = more
supportive, i.e. up-weighting ``z`` lowers the query loss ``m = −log p(y | x)``):

* ``ms-if`` — multi-stage influence ``∇m(θ_ft)ᵀ (G_ft+λ_ft)⁻¹ (G_pt+λ_pt)⁻¹ ∇ℓ_pt(z, θ_pt)``, over the
  backbone blocks the two models share. Works when fine-tuning replaced the head.
* ``ss-if`` — single-stage ``∇m(θ_ft)ᵀ (G_ft+λ_ft)⁻¹ ∇ℓ_pt(z, θ_ft)``; needs a fine-tuned causal LM.
* ``gdp`` — gradient dot product ``∇m(θ_ft)ᵀ ∇ℓ_pt(z, θ_pt)`` (no curvature; candidates on θ_pt so that
  it also applies to a classification fine-tune).
* ``repsim`` — cosine of mean last-layer hidden states, query on θ_ft, candidate on θ_pt.

A query is turned once into ``U = P_pt P_ft ∇m`` per block (:mod:`msif.influence.vectors`, from the
queries of :mod:`msif.influence.queries`); candidates are streamed in batches through θ_pt with hooks
(:mod:`msif.influence.scoring`, chunk by chunk: :mod:`msif.influence.stream`). No per-candidate iHVP,
no parameter gradients. Results: :mod:`msif.influence.results`.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

from ..curvature.factors import FactorError, FactorSet
from ..curvature.hooks import per_example_grads
from ..data.encoding import Encoded, InputError, collate, encode_text, pad_token_id
from ..distributed import barrier, world
from ..models.adapters import tracked_modules
from .queries import PreparedQuery, Query, QueryPreparation
from .results import Attribution, layer_shares, one_query, query_json, role_shares
from .scoring import ScoreResult, score_batches
from .stream import open_store, stream_top_k
from .vectors import QUERY_GRAD_BYTES, QueryVectors, _stderr

__all__ = ["Attribution", "Attributor", "METHODS", "PAD_MULTIPLE", "PreparedQuery", "QUERY_GRAD_BYTES", "Query"]

METHODS = ("ms-if", "ss-if", "gdp", "repsim")
PAD_MULTIPLE = 32  # candidate batches are padded to a multiple of this many tokens


def _load(model, task):
    if isinstance(model, (str, os.PathLike)):
        from ..models.loading import load_model

        return load_model(str(model), task=task)
    return model


def _is_classifier(model: nn.Module) -> bool:
    return "ForSequenceClassification" in type(model).__name__


class Attributor(QueryPreparation, QueryVectors):
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
        return self.score_encoded(U, self.encode_candidates(texts, range(len(texts))), method, per_token=per_token)

    def score_encoded(self, U: dict, encoded: Sequence[Encoded], method: str, per_token: bool = False,
                      subsets: Sequence[Sequence[int]] | None = None) -> ScoreResult:
        """Scores of already encoded candidates (:meth:`encode_candidates`) against ``U``, columns in
        ascending ``Encoded.index`` (``indices``). ``subsets``: per query row, the indices it wants
        (the others are NaN; :func:`~msif.influence.scoring.score_batches`)."""
        res = score_batches(self.candidate_model(method), self.shared, U, self._candidate_batches(list(encoded)),
                            objective="lm", per_token=per_token, subsets=subsets)
        order = torch.argsort(res.indices)  # ascending index: the texts' order for score_texts
        res.scores = res.scores[:, order.to(res.scores.device)]
        if res.per_module is not None:
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
                  dtype: torch.dtype | None = None, release: bool = False, progress: bool = False, log=None,
                  damping_ft=None, damping_pt=None) -> Attribution:
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
        ``damping_ft`` / ``damping_pt``: this call's dampings (default: the attributor's).
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
                          texts=[None] * len(prepared), dampings=self.resolved_dampings(method, damping_ft, damping_pt))
        want_tokens = per_token and method != "repsim"
        if want_tokens:
            att.token_scores, att.tokens = [None] * len(prepared), [None] * len(prepared)
        if method != "repsim":
            att.role_share, att.layer_share = [None] * len(prepared), [None] * len(prepared)
        rank = self.choose_rank(len(prepared), method, rank, max_memory, log)
        store_inputs = self._store_inputs(prepared, corpus, method, rank, dtype, chunk_size, top, att.dampings) if scores_out is not None else None
        vectors = {rows: self.make_query_vectors([prepared[q] for q in qis], method, rank, damping_ft, damping_pt)
                   for rows, qis in groups.items()}
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
                store = open_store(scores_out, store_inputs, [query_json(prepared[q]) for q in qis], n, chunk_size)
            best, absm = stream_top_k(lambda texts, U=U: self.score_texts(U, texts, method), corpus, rows, len(qis), min(top, n),
                                      chunk_size, store, progress and w.main)
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
                res = self.score_texts(one_query(U, j), att.texts[qi], method, per_token=True)
                att.token_scores[qi] = [t[0].tolist() for t in res.per_token]
                att.tokens[qi] = [self._token_strings(t) for t in att.texts[qi]]
            if att.role_share is not None:
                att.role_share[qi] = role_shares(absm[j], roles)
                att.layer_share[qi] = layer_shares(absm[j], modules, roles)

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
        queries = [query_json(p) for p in prepared]
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
